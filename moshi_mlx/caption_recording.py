"""`--record DIR` for live captions: the microphone and its timed transcript, kept as they come.

:class:`CaptionRecorder` takes the microphone's 24 kHz frames (the audio thread), the words, the semantic VAD's
probabilities and the ends of turn (the UI thread), never waiting on the disk. A writer thread puts them into the
folder every :data:`~moshi_mlx.audio.recording.FLUSH_S`, into two files readable at every moment, as the
conversation recorder does (:mod:`moshi_mlx.audio.recording`):

* ``captions-<date>-<time>-mic.partial.wav``: 16-bit mono, its header kept true (:mod:`~moshi_mlx.audio.wav_stream`);
* ``captions-<date>-<time>-events.partial.jsonl``: one JSON object a line: ``{"word", "start", "end"}``,
  ``{"vad": [p0, p1, ...], "t"}`` (each extra head's probability at the end of the frame heard at ``t``),
  ``{"turn_end": t}``.

A crash or ``kill -9`` loses at most the last second; the next ``--record DIR`` finishes what was left
(:func:`recover_unfinished`; a live recording locks its WAV). :meth:`CaptionRecorder.finish` writes, each put in
place whole or not at all: ``-mic.wav``, ``-transcript.txt`` (``start end word`` lines, as ``run_inference``
prints them) and ``-transcript.json`` (the words with start and end, the text, ``vad`` as ``[t, p0, p1, ...]``
rows, ``end_of_turn_detected_at``, what the heads mean). Times are seconds from the first microphone frame.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .audio.files import to_pcm16
from .audio.frames import SAMPLE_RATE
from .audio.recording import FLUSH_S, PartialFiles, RecordingError
from .audio.wav_stream import HEADER_BYTES
from .captions import render
from .errors import first_line
from .outputs import OutputError, atomic_output
from .transcribe import Word, heads_note

STEM = "captions"
SUFFIXES = ("mic.wav", "transcript.txt", "transcript.json")
PARTIAL_SUFFIXES = ("mic.partial.wav", "events.partial.jsonl")
#: What the transcript JSON says the VAD columns are.
VAD_NOTE = "vad rows: [t, p_head0, p_head1, ...] at the end of each frame heard at t seconds: " + heads_note()


@dataclass(frozen=True)
class CaptionFiles:
    mic: Path
    text: Path
    json: Path
    seconds: float

    def __iter__(self):
        return iter((self.mic, self.text, self.json))


#: This recorder's files, for the shared growing-files writer (audio.recording.PartialFiles).
FILES = (STEM, SUFFIXES, PARTIAL_SUFFIXES)


class CaptionRecorder:
    """Thread-safe recorder of one captioned session into ``folder``; nothing is created before the first frame.

    ``on_error`` hears, once, why writing stopped (a full disk): the files then keep what they had.
    """

    def __init__(self, folder: str | os.PathLike, on_error: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self._on_error = on_error
        self._lock = threading.Lock()
        self._audio: list[np.ndarray] = []
        self._events: list[dict[str, Any]] = []
        self._n = 0
        self.started_at: datetime | None = None
        self._partial: PartialFiles | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._run, name="captions-writer", daemon=True)
        self._writer.start()

    # -- feeding (any thread) --------------------------------------------------------------------------
    def _event(self, event: dict[str, Any]) -> None:
        with self._lock:
            if self.started_at is None:
                self.started_at = datetime.now().astimezone()
            self._events.append(event)

    def add_user(self, pcm: np.ndarray) -> None:
        """A microphone frame, as the model heard it (the name the terminal session feeds any recorder by)."""
        chunk = to_pcm16(pcm).reshape(-1)
        with self._lock:
            if self.started_at is None:
                self.started_at = datetime.now().astimezone()
            self._audio.append(chunk)
            self._n += chunk.size

    def add_word(self, word: Word) -> None:
        self._event({"word": word.text, "start": round(word.start, 3), "end": round(word.end, 3)})

    def add_vad(self, t: float, probabilities: tuple[float, ...]) -> None:
        self._event({"t": round(t, 3), "vad": [round(p, 4) for p in probabilities]})

    def add_turn_end(self, t: float) -> None:
        self._event({"turn_end": round(t, 3)})

    @property
    def seconds(self) -> float:
        with self._lock:
            return self._n / SAMPLE_RATE

    # -- the writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            audio, self._audio = self._audio, []
            events, self._events = self._events, []
            started = self.started_at
        if self.error is not None or (not audio and not events):
            return
        try:
            if self._partial is None:
                self._partial = PartialFiles(self.folder, started, SAMPLE_RATE, 1, FILES)
            self._partial.append(np.concatenate(audio) if audio else np.zeros(0, "<i2"), events)
        except (OSError, ValueError) as e:  # a full disk, the folder gone
            self.error = getattr(e, "strerror", None) or first_line(e)
            if self._on_error is not None:
                self._on_error(f"the recording stopped: {self.error}")

    def finish(self, info: dict[str, Any] | None = None) -> CaptionFiles | None:
        """Write what is in memory, then the three files (None: nothing was recorded). Once only."""
        if self._stop.is_set():
            raise RuntimeError("the recording is already finished")
        self._stop.set()
        self._writer.join()
        partial = self._partial
        if partial is None:
            if self.error is not None:
                raise RecordingError(f"{self.folder}: cannot write the recording ({self.error})")
            return None
        try:
            partial.close()
        except OSError as e:
            self.error = self.error or e.strerror or first_line(e)
        if self.error is not None:
            raise RecordingError(f"{self.folder}: the recording stopped ({self.error}); what was recorded stays in "
                                 f"{partial.wav.path.name}")
        return _finalise(self.folder, partial.stem, partial.paths, self.started_at, info)


def _read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            break  # the last line, cut short by a kill
        if isinstance(event, dict):
            events.append(event)
    return events


def _finalise(folder: Path, stem: str, partial: tuple[Path, Path], started: datetime | None,
              info: dict[str, Any] | None) -> CaptionFiles:
    wav_part, events_part = partial
    seconds = max(0, wav_part.stat().st_size - HEADER_BYTES) / 2 / SAMPLE_RATE
    events = _read_events(events_part)
    words = [Word(str(e["word"]), float(e["start"]), float(e["end"])) for e in events if "word" in e]
    meta = {
        "started_at": started.isoformat(timespec="seconds") if started else None,
        "seconds": round(seconds, 3), "sample_rate": SAMPLE_RATE,
        "vad_note": VAD_NOTE,
        "vad": [[e["t"], *e["vad"]] for e in events if "vad" in e],
        "end_of_turn_detected_at": [e["turn_end"] for e in events if "turn_end" in e],
        **(info or {}),
    }
    paths = [folder / f"{stem}-{s}" for s in SUFFIXES]
    made: list[Path] = []
    try:
        os.link(wav_part, paths[0])  # the closed partial WAV is complete: it becomes the mic file
        made.append(paths[0])
        for path, fmt in zip(paths[1:], (".txt", ".json")):
            with atomic_output(path, overwrite=False) as tmp:
                tmp.write_text(render(words, fmt, meta), encoding="utf-8")
            made.append(path)
    except (OutputError, OSError) as e:
        for p in made:
            p.unlink(missing_ok=True)
        raise RecordingError(f"{folder}: cannot write the recording ({first_line(e)}); what was recorded stays in "
                             f"{wav_part.name}") from None
    for p in partial:
        p.unlink(missing_ok=True)
    return CaptionFiles(*paths, seconds=seconds)


def recover_unfinished(folder: str | os.PathLike) -> list[CaptionFiles]:
    """Finish the caption recordings a crash or ``kill -9`` left in ``folder`` (live ones, locked, are left alone)."""
    folder = Path(folder).expanduser()
    done = []
    for wav_part in sorted(folder.glob(f"{STEM}-*-{PARTIAL_SUFFIXES[0]}")):
        stem = wav_part.name[: -len(PARTIAL_SUFFIXES[0]) - 1]
        try:
            f = open(wav_part, "r+b")
        except OSError:
            continue
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its recorder is alive
                continue
            head = f.read(HEADER_BYTES)
            if len(head) < HEADER_BYTES or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                continue
            f.truncate(HEADER_BYTES + int.from_bytes(head[40:44], "little"))  # a write the kill cut short
            done.append(_finalise(folder, stem, (wav_part, folder / f"{stem}-{PARTIAL_SUFFIXES[1]}"), None,
                                  {"recovered": "finished after the process ended without closing it (crash or kill)"}))
    return done
