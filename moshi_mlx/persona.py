"""A persona model's system prompt (NVIDIA's PersonaPlex): voice, silence, role text, silence, then talk.

The sequence follows NVIDIA's `LMGen.step_system_prompts`; every prompt frame decides all of Moshi's streams
(text and its 8 codebooks) and the user's stream:

    voice      Moshi's audio: the voice's Mimi codes      text: ZERO_TEXT  user: SINE_TOKENS
    silence    Moshi's audio: SILENCE_TOKENS (x6)          text: ZERO_TEXT  user: SINE_TOKENS
    role text  Moshi's audio: SILENCE_TOKENS               text: one token of "<system> ... <system>" per frame
    silence    as above (x6)

A voice preset replays its stored temporal-input embeddings instead of the voice frames (one step each, the
user's and Moshi's tokens there being NVIDIA's dummies), then puts back the token buffers it recorded.

Alignment. Our LmGen's step t reads position t - 1 of every stream (the user's frame t - 1 - delay) and decides
position t; NVIDIA's offset n reads position n - 1 too, but its first call (offset 0) only primes the buffers:
the frame given there is replaced by the start tokens before any forward. So NVIDIA's offset n is our step
n - 1 and the prompt's first frame has no effect; we skip it. With a preset, its T embeddings are our steps
0..T-1 (NVIDIA's offsets 1..T) and its cache is NVIDIA's ring at offset T + 1: position p at column p % ring.

After the prompt the KV cache and token buffers are snapshotted (`PromptSnapshots`); a new conversation with
the same (voice, text) restores them. Mimi needs nothing: NVIDIA resets it after the prompt, and so do we.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .audio.frames import FRAME_SIZE
from .errors import MoshiError
from .generate import GenSnapshot, LmGen
from .models.config import LmConfig
from .voices import Voice, VoiceError

__all__ = [
    "PROMPT_CODEBOOKS", "SILENCE_FRAMES", "SILENCE_TOKENS", "SINE_TOKENS", "ZERO_TEXT_TOKEN", "PersonaPrompt",
    "PromptSnapshots", "check_persona_model", "play_prompt", "prompt_tokens", "voice_codes", "wrap_system",
]

PROMPT_CODEBOOKS = 8  # codebooks per stream in the prompt's fixed frames
SILENCE_TOKENS = np.array([948, 243, 1178, 546, 1736, 1030, 1978, 2008], dtype=np.int32)  # Mimi codes of silence
SINE_TOKENS = np.array([430, 1268, 381, 1611, 1095, 1495, 56, 472], dtype=np.int32)  # of a 440 Hz tone
ZERO_TEXT_TOKEN = 3  # the text stream's token during the voice and the silences
SILENCE_FRAMES = 6  # 0.5 s at 12.5 Hz after the voice and after the text
SYSTEM_TAG = "<system>"
# Prompt snapshots an engine keeps (least recently used goes first). One holds the prompt's KV slots: on Moshi 7B
# 0.27 MB per prompt step with the default 8-bit KV (0.5 MB at 16, 0.14 MB at 4), so a 200-step prompt (a 10 s
# voice, silences, ~60 text tokens) takes 53 MB and four of them 213 MB.
SNAPSHOTS_KEPT = 4


class PersonaError(MoshiError):
    """A system prompt this model cannot take (one line)."""


def check_persona_model(config: LmConfig) -> None:
    """The prompt's fixed frames need PersonaPlex's layout: 8 codebooks of 2048 codes on each stream."""
    if (config.generated_codebooks != PROMPT_CODEBOOKS or config.user_codebooks != PROMPT_CODEBOOKS
            or config.audio_card <= int(max(SILENCE_TOKENS.max(), SINE_TOKENS.max()))
            or config.text_out_vocab_size <= ZERO_TEXT_TOKEN):
        raise PersonaError(
            "--text-prompt / --voice need a persona model (NVIDIA's PersonaPlex: 8 + 8 codebooks of 2048 codes); "
            f"this one has {config.generated_codebooks} + {config.user_codebooks} of {config.audio_card}"
        )


def wrap_system(text: str) -> str:
    """The role text between `<system>` tags, as NVIDIA's server sends it (left alone if already tagged)."""
    text = text.strip()
    if text.startswith(SYSTEM_TAG) and text.endswith(SYSTEM_TAG) and len(text) > len(SYSTEM_TAG):
        return text
    return f"{SYSTEM_TAG} {text} {SYSTEM_TAG}"


def prompt_tokens(encode: Callable[[str], list[int]], text: str | None) -> tuple[int, ...]:
    """The role text's tokens (empty text: none)."""
    if text is None or not text.strip():
        return ()
    return tuple(int(t) for t in encode(wrap_system(text)))


@dataclass(frozen=True, eq=False)
class PersonaPrompt:
    voice: Voice | None
    text_tokens: tuple[int, ...]

    def steps(self) -> int:
        """LmGen steps the prompt takes (NVIDIA's first frame is skipped, see the module's note)."""
        if self.voice is None:
            voice = 0
        elif self.voice.is_preset:
            voice = self.voice.embeddings.shape[0] + 1  # NVIDIA's offset-0 call comes before the embeddings
        else:
            voice = -(-self.voice.pcm.shape[0] // FRAME_SIZE)
        return voice + 2 * SILENCE_FRAMES + len(self.text_tokens) - 1

    @property
    def key(self) -> tuple:
        return (None if self.voice is None else self.voice.key, self.text_tokens)

    def check(self, config: LmConfig, context: int) -> None:
        """One line for a voice of the wrong shapes or a prompt longer than the attention window."""
        check_persona_model(config)
        voice = self.voice
        if voice is not None and voice.is_preset:
            d = config.transformer.d_model
            ring = (1 + config.audio_codebooks, config.max_delay + 3)
            if voice.embeddings.shape[1] != d or tuple(voice.cache.shape) != ring:
                raise VoiceError(
                    f"voice {voice.name}: made for another model (embeddings width {voice.embeddings.shape[1]}, "
                    f"cache {list(voice.cache.shape)}; this model needs {d} and {list(ring)})"
                )
        if self.steps() >= context:
            raise PersonaError(
                f"the system prompt takes {self.steps()} frames ({self.steps() * FRAME_SIZE / 24000:.1f} s) but the "
                f"model attends to {context}: shorten the text or the voice"
            )


def _frame(text: int, moshi: np.ndarray) -> np.ndarray:
    return np.concatenate([[text], moshi]).astype(np.int32)


def voice_codes(pcm: np.ndarray, encode: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """The voice's Mimi codes frame by frame (the last frame padded with zeros), 8 codebooks each."""
    frames = -(-pcm.shape[0] // FRAME_SIZE)
    padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    padded[: pcm.shape[0]] = pcm
    return [np.asarray(encode(padded[i * FRAME_SIZE:(i + 1) * FRAME_SIZE]))[:PROMPT_CODEBOOKS] for i in range(frames)]


def play_prompt(
    gen: LmGen, prompt: PersonaPrompt, encode: Callable[[np.ndarray], np.ndarray] | None, batched: bool = True,
    codes: list[np.ndarray] | None = None,
) -> None:
    """Run the prompt on a freshly reset `gen`, then mark the conversation's start.

    `encode`: the engine's Mimi (one frame of 24 kHz PCM -> codes), for a voice given as audio.
    `codes`: the voice's Mimi codes when already known (`voice_codes`), instead of `encode`.
    `batched`: every prompt token is known in advance, so the temporal transformer takes the prompt in chunks
    of positions (LmGen.prefill) instead of one step at a time, as NVIDIA does; same state either way.
    """
    silence = _frame(ZERO_TEXT_TOKEN, SILENCE_TOKENS)
    frames: list[np.ndarray] = []  # Moshi's side of each frame; the user's is always SINE_TOKENS
    voice = prompt.voice
    if voice is not None and voice.is_preset:
        _replay_preset(gen, voice, batched)
    elif voice is not None:
        if codes is None and encode is None:
            raise ValueError("a voice recording needs a Mimi to encode it")
        codes = voice_codes(voice.pcm, encode) if codes is None else codes
        frames += [_frame(ZERO_TEXT_TOKEN, c) for c in codes]
    frames += [silence] * SILENCE_FRAMES
    frames += [_frame(t, SILENCE_TOKENS) for t in prompt.text_tokens]
    frames += [silence] * SILENCE_FRAMES
    if voice is None or not voice.is_preset:
        frames = frames[1:]  # NVIDIA's offset-0 frame: see the module's note on alignment
    _run(gen, [(SINE_TOKENS, frame, None) for frame in frames], batched)
    gen.begin_conversation()


def _run(gen: LmGen, steps: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], batched: bool) -> None:
    if batched:
        gen.prefill(steps)
    else:
        for user, frame, embedding in steps:
            gen.step(user, forced=frame, embedding=embedding)


def _replay_preset(gen: LmGen, voice: Voice, batched: bool) -> None:
    """The preset's embeddings one step each, then NVIDIA's token ring put back into our buffers."""
    cfg = gen.config
    dummy = np.full(cfg.user_codebooks, 0, dtype=np.int32)  # overwritten below: never read by the model
    blank = _frame(ZERO_TEXT_TOKEN, np.zeros(cfg.generated_codebooks, np.int32))
    _run(gen, [(dummy, blank, embedding) for embedding in voice.embeddings], batched)
    ring, t = voice.cache, voice.embeddings.shape[0]
    width = ring.shape[1]
    delays = np.array([0, *cfg.audio_delays])
    gen_rows = 1 + cfg.generated_codebooks

    def at(position: int) -> np.ndarray:  # NVIDIA's position -> every stream's token there
        return ring[:, position % width]

    def user_frame(f: int) -> np.ndarray:  # our user frame f: NVIDIA's frame f + 1, at position f + 1 + delay
        return np.array([at(f + 1 + delays[gen_rows + j])[gen_rows + j] for j in range(cfg.user_codebooks)])

    forced: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for q in range(t, t + cfg.max_delay):  # our positions the preset's last frames still decide
        mask = (q - delays[:gen_rows]) < t
        forced[q] = (np.where(mask, at(q + 1)[:gen_rows], 0).astype(np.int32), mask)
    gen.set_token_state(
        last_generated=at(t)[:gen_rows],
        user_frames=[user_frame(f) for f in range(max(t - cfg.max_delay - 1, 0), t)],
        generated=[at(p + 1)[:gen_rows] for p in range(max(t - cfg.max_delay - 1, 0), t)],
        forced={q: v for q, v in forced.items() if v[1].any()},
    )


class PromptSnapshots:
    """The LmGen state after each recent prompt, least recently used dropped beyond `kept`."""

    def __init__(self, kept: int = SNAPSHOTS_KEPT) -> None:
        self.kept = kept
        self._items: OrderedDict[tuple, GenSnapshot] = OrderedDict()

    def get(self, key: tuple) -> GenSnapshot | None:
        snap = self._items.get(key)
        if snap is not None:
            self._items.move_to_end(key)
        return snap

    def put(self, key: tuple, snap: GenSnapshot) -> None:
        self._items[key] = snap
        self._items.move_to_end(key)
        while len(self._items) > self.kept:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._items.values())

    def __len__(self) -> int:
        return len(self._items)
