"""Voices for a persona model (NVIDIA's PersonaPlex): a recording, or a preset replayed without Mimi.

A voice is either **audio** (`Voice.pcm`: 24 kHz mono float32, brought to -24 LUFS as NVIDIA does before Mimi
encodes it; the engine's Mimi turns it into Moshi's stream during the prompt) or a **preset**
(`Voice.embeddings` [T, d_model] float32: the temporal transformer's input embeddings of a recorded prompt,
replayed as they are, plus `Voice.cache`: NVIDIA's token ring buffer [1 + n_q, max_delay + 3] at its end).

    load_voice("NATF2", voices_dir)      # voices_dir/NATF2.safetensors (made by `convert --voices`)
    load_voice("me.wav", None)           # any audio file our reader takes, resampled to 24 kHz
    load_voice("x.safetensors", None)    # a converted preset given by path
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio.frames import SAMPLE_RATE
from .audio.loudness import normalise
from .errors import MoshiError

__all__ = ["PRESET_SUFFIX", "TARGET_LUFS", "Voice", "VoiceError", "list_voices", "load_voice"]

PRESET_SUFFIX = ".safetensors"
TARGET_LUFS = -24.0  # NVIDIA's loudness for a voice prompt recording
EMBEDDINGS_KEY, CACHE_KEY = "embeddings", "cache"  # the tensors of a converted preset
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


class VoiceError(MoshiError):
    """A voice that cannot be used: unknown name, unreadable file, wrong shapes (one line)."""


@dataclass(frozen=True, eq=False)
class Voice:
    name: str
    pcm: np.ndarray | None = None  # float32 [samples] at 24 kHz, loudness-normalised
    embeddings: np.ndarray | None = None  # float32 [T, d_model]
    cache: np.ndarray | None = None  # int32 [1 + n_q, ring]: NVIDIA's token buffer after the preset's last frame

    def __post_init__(self) -> None:
        if (self.pcm is None) == (self.embeddings is None):
            raise VoiceError(f"voice {self.name}: give either audio or embeddings")
        if self.embeddings is not None and self.cache is None:
            raise VoiceError(f"voice {self.name}: a preset needs its token cache")

    @property
    def is_preset(self) -> bool:
        return self.embeddings is not None

    @property
    def key(self) -> tuple:
        """What identifies this voice's effect on the model (for the prompt snapshot cache)."""
        data = self.embeddings if self.embeddings is not None else self.pcm
        return (self.name, data.shape, hash(data.tobytes()), None if self.cache is None else hash(self.cache.tobytes()))


def list_voices(voices_dir: Path | None) -> list[str]:
    """Preset names (file stems of NAME.safetensors) in `voices_dir`, sorted; [] without one."""
    if voices_dir is None or not Path(voices_dir).is_dir():
        return []
    return sorted(p.stem for p in Path(voices_dir).iterdir() if p.suffix == PRESET_SUFFIX and p.is_file())


def looks_like_path(spec: str) -> bool:
    """A voice spec that names a file rather than a preset."""
    return os.sep in spec or "/" in spec or Path(spec).suffix.lower() in (*AUDIO_SUFFIXES, PRESET_SUFFIX, ".pt")


def load_voice(spec: str, voices_dir: Path | None) -> Voice:
    """A preset NAME (voices_dir/NAME.safetensors) or a PATH to an audio file or a converted preset."""
    spec = spec.strip()
    if not spec:
        raise VoiceError("--voice: empty name")
    if not looks_like_path(spec):
        path = Path(voices_dir) / f"{spec}{PRESET_SUFFIX}" if voices_dir is not None else None
        if path is None or not path.is_file():
            known = list_voices(voices_dir)
            where = f"in {voices_dir}" if voices_dir is not None else "(no voices folder: give --voices-dir or a path)"
            raise VoiceError(f"unknown voice {spec!r} {where}; known: {', '.join(known) or 'none'}")
        return _load_preset(path, spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise VoiceError(f"voice {spec}: no such file")
    if path.suffix.lower() == ".pt":
        raise VoiceError(f"voice {spec}: a torch preset; convert it once with "
                         "`python -m moshi_mlx.convert --voices voices.tgz`")
    if path.suffix.lower() == PRESET_SUFFIX:
        return _load_preset(path, path.stem)
    from .audio.files import AudioFileError, load_mono_24k  # here: a preset needs no audio library

    try:
        pcm, _ = load_mono_24k(path)
    except AudioFileError as e:
        raise VoiceError(f"voice {spec}: {e}") from None
    if pcm.size == 0:
        raise VoiceError(f"voice {spec}: the file holds no audio")
    return Voice(name=path.stem, pcm=normalise(pcm, SAMPLE_RATE, TARGET_LUFS))


def _load_preset(path: Path, name: str) -> Voice:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VoiceError(f"voice {path}: not a converted preset ({str(e).splitlines()[0] if str(e) else e})") from None
    missing = {EMBEDDINGS_KEY, CACHE_KEY} - set(tensors)
    if missing:
        raise VoiceError(f"voice {path}: not a converted preset (no {', '.join(sorted(missing))} tensor)")
    emb, cache = tensors[EMBEDDINGS_KEY], tensors[CACHE_KEY]
    if emb.ndim != 2 or emb.shape[0] < 1 or cache.ndim != 2:
        raise VoiceError(f"voice {path}: expected embeddings [T, d_model] and cache [streams, ring], "
                         f"got {list(emb.shape)} and {list(cache.shape)}")
    return Voice(name=name, embeddings=emb.astype(np.float32), cache=cache.astype(np.int32))
