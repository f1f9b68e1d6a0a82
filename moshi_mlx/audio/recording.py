"""Save a conversation: both voices as heard and Moshi's timed transcript.

:class:`ConversationRecorder` collects 24 kHz mono frames of the user's microphone and of Moshi's
voice (each side in the order it was heard; the front end feeds them from one audio clock) and the
transcript pieces with their times, then :meth:`~ConversationRecorder.save` writes four files into a
folder:

* ``<stem>-stereo.wav``: 16-bit stereo, you on the left, Moshi on the right;
* ``<stem>-mixed.wav``: both voices mixed to mono (what a listener in the room heard);
* ``<stem>-transcript.txt``: Moshi's words;
* ``<stem>-transcript.json``: the pieces with their start times, plus what the files hold.

``<stem>`` is ``moshi-<date>-<time>`` with a counter appended when needed: a recording never replaces
an earlier one. Each file is written to a temporary name in the same folder and then linked into place,
so a crash leaves either the whole file or nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soundfile as sf

from ..errors import MoshiError, first_line
from ..outputs import OutputError, atomic_output, fresh_paths
from .files import to_pcm16
from .frames import SAMPLE_RATE

SUFFIXES = ("stereo.wav", "mixed.wav", "transcript.txt", "transcript.json")


class RecordingError(MoshiError, OSError):
    """The recording folder or one of its files cannot be written."""


@dataclass(frozen=True)
class RecordingFiles:
    stereo: Path
    mixed: Path
    text: Path
    json: Path
    seconds: float

    def __iter__(self):
        return iter((self.stereo, self.mixed, self.text, self.json))


class ConversationRecorder:
    """Thread-safe collector of one conversation (the audio callback and the UI thread both feed it).

    Audio is kept as 16-bit samples: about 170 MB per hour for the two voices.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, clock: Callable[[], float] = time.monotonic) -> None:
        self.sample_rate = sample_rate
        self._clock = clock
        self._lock = threading.Lock()
        self._user: list[np.ndarray] = []
        self._moshi: list[np.ndarray] = []
        self._n_user = 0
        self._n_moshi = 0
        self._pieces: list[dict[str, Any]] = []
        self._t0: float | None = None
        self.started_at: datetime | None = None

    def _start(self) -> None:
        if self._t0 is None:
            self._t0 = self._clock()
            self.started_at = datetime.now().astimezone()

    def add_user(self, pcm: np.ndarray) -> None:
        """The microphone as the model heard it (after echo cancellation)."""
        chunk = to_pcm16(pcm).reshape(-1)
        with self._lock:
            self._start()
            self._user.append(chunk)
            self._n_user += chunk.size

    def add_moshi(self, pcm: np.ndarray) -> None:
        """Moshi's voice as played (silence included, so it stays in step with the microphone)."""
        chunk = to_pcm16(pcm).reshape(-1)
        with self._lock:
            self._start()
            self._moshi.append(chunk)
            self._n_moshi += chunk.size

    def add_text(self, text: str, t: float | None = None) -> None:
        """A transcript piece; ``t`` is its time in seconds from the start (default: now)."""
        if not text:
            return
        with self._lock:
            self._start()
            if t is None:
                t = self._clock() - self._t0
            self._pieces.append({"t": round(float(t), 3), "text": text})

    @property
    def seconds(self) -> float:
        with self._lock:
            return max(self._n_user, self._n_moshi) / self.sample_rate

    @property
    def empty(self) -> bool:
        with self._lock:
            return not (self._n_user or self._n_moshi or self._pieces)

    def transcript(self) -> str:
        with self._lock:
            return "".join(p["text"] for p in self._pieces).strip()

    def save(self, directory: str | os.PathLike, info: dict[str, Any] | None = None) -> RecordingFiles:
        """Write the four files into ``directory`` (created if needed) under a fresh name."""
        with self._lock:
            user = np.concatenate(self._user) if self._user else np.zeros(0, "<i2")
            moshi = np.concatenate(self._moshi) if self._moshi else np.zeros(0, "<i2")
            pieces = list(self._pieces)
            started = self.started_at or datetime.now().astimezone()
        n = max(user.size, moshi.size)
        stereo = np.zeros((n, 2), "<i2")
        stereo[: user.size, 0] = user
        stereo[: moshi.size, 1] = moshi
        mixed = np.clip(stereo.astype(np.int32).sum(axis=1), -32767, 32767).astype("<i2")
        text = "".join(p["text"] for p in pieces).strip()
        seconds = n / self.sample_rate

        folder = Path(directory).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordingError(f"--record {folder}: cannot create the folder ({e.strerror or e})") from None
        for _ in range(1000):  # a name is only a proposal: another recording may take it meanwhile
            paths = fresh_paths(folder, "moshi", [f"-{suffix}" for suffix in SUFFIXES], started.timestamp())
            meta = {
                "started_at": started.isoformat(timespec="seconds"),
                "seconds": round(seconds, 3),
                "sample_rate": self.sample_rate,
                "channels": {"left": "you (microphone, after echo cancellation)", "right": "Moshi"},
                "files": dict(zip(("stereo", "mixed", "text", "json"), (p.name for p in paths))),
                "text": text,
                "pieces": pieces,
                **(info or {}),
            }
            writers = [
                lambda tmp: sf.write(tmp, stereo, self.sample_rate, subtype="PCM_16", format="WAV"),
                lambda tmp: sf.write(tmp, mixed, self.sample_rate, subtype="PCM_16", format="WAV"),
                lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"),
                lambda tmp: tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"),
            ]
            try:
                for path, write in zip(paths, writers):
                    with atomic_output(path, overwrite=False) as tmp:  # never replaces an earlier recording
                        write(tmp)
            except FileExistsError:  # another recording took this name meanwhile: use the next one
                continue
            except (OutputError, OSError, sf.LibsndfileError) as e:
                raise RecordingError(f"{folder}: cannot write the recording ({first_line(e)})") from None
            return RecordingFiles(*paths, seconds=seconds)
        raise RecordingError(f"{folder}: no free file name for moshi-{started:%Y%m%d-%H%M%S}")
