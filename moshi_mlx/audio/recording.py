"""Save a conversation as it happens: both voices as heard and Moshi's timed transcript.

:class:`ConversationRecorder` takes 24 kHz mono frames of the user's microphone and of Moshi's voice
(each side in the order it was heard; the front end feeds them from one audio clock) and transcript
pieces, from any thread, without waiting on the disk. A writer thread puts them into the folder every
:data:`FLUSH_S`, into two files that are readable at every moment:

* ``<stem>-stereo.partial.wav``: 16-bit stereo, you on the left, Moshi on the right, its header kept
  true (:mod:`.wav_stream`);
* ``<stem>-transcript.partial.jsonl``: one ``{"t": seconds, "text": piece}`` line per piece.

So a crash or ``kill -9`` loses at most the last second, and the next ``--record`` into that folder
finishes what was left (:func:`recover_unfinished`; a live recording holds a lock on its partial WAV
and is left alone). :meth:`~ConversationRecorder.finish` turns them into the four files of a
recording, each put in place atomically (whole or absent), then removes the partial ones:

* ``<stem>-stereo.wav``; ``<stem>-mixed.wav``: both voices mixed to mono (what a listener in the room heard);
* ``<stem>-transcript.txt``: Moshi's words; ``<stem>-transcript.json``: the pieces with their start
  times and ``speaker``, plus what the files hold. With the user's words too (``--transcribe-user``: pieces
  with ``speaker`` "you" and an ``end``), the pieces are in time order, ``text`` stays Moshi's words,
  ``user_text`` holds the user's and the ``.txt`` becomes the dialogue (``[12.3 s] you: ...`` lines).

``<stem>`` is ``moshi-<date>-<time>`` with a counter appended when needed: a recording never replaces a file.
Memory stays bounded (the audio is on disk, not in a list), whatever the conversation's length.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from ..errors import MoshiError, first_line
from ..outputs import OutputError, atomic_output, fresh_paths
from .files import to_pcm16
from .frames import SAMPLE_RATE
from .wav_stream import HEADER_BYTES, WavStream, read_frames, stereo_to_mixed

#: Who said a transcript piece: the names the transcript JSON's `speaker`, the terminal and the web UI use.
MOSHI, USER = "moshi", "you"
SUFFIXES = ("stereo.wav", "mixed.wav", "transcript.txt", "transcript.json")
PARTIAL_SUFFIXES = ("stereo.partial.wav", "transcript.partial.jsonl")
STEM = "moshi"
#: How often the writer thread puts what came in on disk: a crash loses at most this, plus one side's lead.
FLUSH_S = 0.5
#: One side may run ahead of the other (a stalled device) by this much before the other is taken as silence.
MAX_SKEW_S = 1.0


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


class PartialFiles:
    """The two growing files of one recording in progress: a WAV (locked while it lives, so that
    recovery never touches a live recording) and a JSON-lines file of timed pieces, both synced as they grow.
    `kind` is (stem, final suffixes, partial suffixes): the name is reserved against the final files too."""

    def __init__(
        self, folder: Path, started: datetime, rate: int, channels: int,
        kind: tuple[str, tuple[str, ...], tuple[str, str]] | None = None,
    ) -> None:
        stem, finals, partials = kind or (STEM, SUFFIXES, PARTIAL_SUFFIXES)
        for _ in range(1000):  # a name is only a proposal: another recording may take it meanwhile
            *_, wav_path, lines_path = fresh_paths(
                folder, stem, [f"-{s}" for s in finals + partials], started.timestamp()
            )
            try:
                self.wav = WavStream(wav_path, channels, rate, new=True)
            except FileExistsError:
                continue
            try:
                fcntl.flock(self.wav.fileno, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.lines: IO[str] = open(lines_path, "x", encoding="utf-8")
            except BaseException:
                self.wav.close()
                os.unlink(wav_path)
                raise
            self.stem = wav_path.name[: -len(partials[0]) - 1]
            return
        raise FileExistsError(f"no free file name for {stem}-{started:%Y%m%d-%H%M%S}")

    @property
    def paths(self) -> tuple[Path, Path]:
        return self.wav.path, Path(self.lines.name)

    def append(self, frames: np.ndarray, pieces: list[dict[str, Any]]) -> None:
        """`frames`: int16 samples [n, channels] (or [n] for mono); `pieces`: one JSON line each."""
        if len(frames):
            self.wav.write(frames.reshape(len(frames), -1))
            self.wav.commit()
        if pieces:
            self.lines.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pieces))
            self.lines.flush()
            os.fsync(self.lines.fileno())

    def close(self) -> None:
        try:
            self.wav.close()
        finally:
            self.lines.close()


class ConversationRecorder:
    """Thread-safe recorder of one conversation into ``folder`` (the audio callback and the UI thread both feed it).

    Nothing is created before the first frame or piece. ``on_error`` hears, once, why writing stopped
    (a full disk): the files then keep what they had.
    """

    def __init__(
        self, folder: str | os.PathLike, sample_rate: int = SAMPLE_RATE, clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.folder = Path(folder).expanduser()
        self.sample_rate = sample_rate
        self._clock = clock
        self._on_error = on_error
        self._lock = threading.Lock()
        self._user: list[np.ndarray] = []
        self._moshi: list[np.ndarray] = []
        self._pieces: list[dict[str, Any]] = []
        self._all_pieces: list[dict[str, Any]] = []
        self._n_user = self._n_moshi = 0
        self._t0: float | None = None
        self.started_at: datetime | None = None
        # The writer thread's own state.
        self._left = (np.zeros(0, "<i2"), np.zeros(0, "<i2"))  # what one side has that the other has not yet
        self._partial: PartialFiles | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._run, name="recording-writer", daemon=True)
        self._writer.start()

    # -- feeding (any thread, never waits on the disk) -------------------------------------------
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

    def add_text(self, text: str, t: float | None = None, speaker: str = MOSHI, end: float | None = None) -> None:
        """A transcript piece; ``t`` is its time in seconds from the start (default: now). ``speaker``: whose
        words (:data:`MOSHI`, or :data:`USER` for the user's words from a speech-to-text model, with their
        ``end``); pieces may come out of time order (the STT model's delay): the finished transcript sorts them."""
        if not text:
            return
        with self._lock:
            self._start()
            if t is None:
                t = self._clock() - self._t0
            piece: dict[str, Any] = {"t": round(float(t), 3), "text": text, "speaker": speaker}
            if end is not None:
                piece["end"] = round(float(end), 3)
            self._pieces.append(piece)
            self._all_pieces.append(piece)

    @property
    def seconds(self) -> float:
        with self._lock:
            return max(self._n_user, self._n_moshi) / self.sample_rate

    @property
    def empty(self) -> bool:
        with self._lock:
            return not (self._n_user or self._n_moshi or self._all_pieces)

    def transcript(self) -> str:
        """Moshi's words."""
        with self._lock:
            return _words_of(self._all_pieces, MOSHI)

    @property
    def partial_paths(self) -> tuple[Path, Path] | None:
        """The growing stereo WAV and transcript lines, once the first frame or piece came."""
        return None if self._partial is None else self._partial.paths

    # -- the writer thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self._flush(last=False)
        self._flush(last=True)

    def _flush(self, last: bool) -> None:
        with self._lock:
            users, self._user = self._user, []
            moshis, self._moshi = self._moshi, []
            pieces, self._pieces = self._pieces, []
            started = self.started_at
        if self.error is not None:
            return  # writing stopped; what came in is dropped, memory stays bounded
        user = np.concatenate([self._left[0], *users])
        moshi = np.concatenate([self._left[1], *moshis])
        longer = max(user.size, moshi.size)
        # Both sides together, except a side that runs MAX_SKEW_S ahead (the other is then silent), and all at the end.
        n = longer if last else max(min(user.size, moshi.size), longer - int(MAX_SKEW_S * self.sample_rate))
        stereo = np.zeros((n, 2), "<i2")
        stereo[: min(n, user.size), 0] = user[:n]
        stereo[: min(n, moshi.size), 1] = moshi[:n]
        self._left = (user[n:], moshi[n:])
        if not n and not pieces:
            return
        try:
            if self._partial is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._partial = PartialFiles(self.folder, started, self.sample_rate, 2)
            self._partial.append(stereo, pieces)
        except (OSError, ValueError) as e:  # a full disk, a file-size limit, the folder gone
            self.error = getattr(e, "strerror", None) or first_line(e)
            if self._on_error is not None:
                self._on_error(f"the recording stopped: {self.error}")

    # -- the end ---------------------------------------------------------------------------------------
    def finish(self, info: dict[str, Any] | None = None) -> RecordingFiles | None:
        """Write what is still in memory, then the four files (None: nothing was ever recorded). Once only."""
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
        if self.error is not None:  # no finished files from a recording cut short; the next --record finishes it
            raise RecordingError(
                f"{self.folder}: the recording stopped after {partial.wav.committed / self.sample_rate:.1f} s "
                f"({self.error}); what was recorded stays in {partial.wav.path.name}"
            )
        with self._lock:
            pieces = list(self._all_pieces)
        return _finalise(self.folder, partial.stem, partial.paths, self.started_at, pieces, self.sample_rate, info)


def _finalise(
    folder: Path, stem: str, partial: tuple[Path, Path], started: datetime, pieces: list[dict[str, Any]], rate: int,
    info: dict[str, Any] | None,
) -> RecordingFiles:
    """The four files from a closed partial recording, each whole or absent; then the partial ones go."""
    wav_part, text_part = partial
    frames = sum(f.shape[0] for f in read_frames(wav_part, 1 << 20))
    seconds = frames / rate
    pieces = _in_time_order(pieces)
    text = _words_of(pieces, MOSHI)
    two_sided = any(p.get("speaker", MOSHI) != MOSHI for p in pieces)
    text_file = _dialogue(pieces) if two_sided else text
    for attempt in range(1000):
        paths = (
            [folder / f"{stem}-{s}" for s in SUFFIXES] if attempt == 0
            else fresh_paths(folder, STEM, [f"-{s}" for s in SUFFIXES], started.timestamp())
        )
        meta = {
            "started_at": started.isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
            "sample_rate": rate,
            "channels": {"left": "you (microphone, after echo cancellation)", "right": "Moshi"},
            "files": dict(zip(("stereo", "mixed", "text", "json"), (p.name for p in paths))),
            "text": text,
            **({"user_text": _words_of(pieces, USER)} if two_sided else {}),
            "pieces": pieces,
            **(info or {}),
        }
        made: list[Path] = []
        try:
            _link_new(wav_part, paths[0])  # the closed partial WAV is complete: it becomes the stereo file
            made.append(paths[0])
            writers = [
                lambda tmp: stereo_to_mixed(wav_part, tmp, rate),
                lambda tmp: tmp.write_text(text_file + "\n", encoding="utf-8"),
                lambda tmp: tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"),
            ]
            for path, write in zip(paths[1:], writers):
                with atomic_output(path, overwrite=False) as tmp:  # never replaces a file
                    write(tmp)
                made.append(path)
        except FileExistsError:  # a file of that name appeared meanwhile: ours go, the next name is tried
            for p in made:
                p.unlink(missing_ok=True)
            continue
        except (OutputError, OSError) as e:
            for p in made:
                p.unlink(missing_ok=True)
            raise RecordingError(
                f"{folder}: cannot write the recording ({first_line(e)}); what was recorded stays in {wav_part.name}"
            ) from None
        for p in (wav_part, text_part):
            p.unlink(missing_ok=True)
        return RecordingFiles(*paths, seconds=seconds)
    raise RecordingError(f"{folder}: no free file name for {stem}")


def _link_new(src: Path, dst: Path) -> None:
    """``src`` also under the new name ``dst`` (FileExistsError if taken), without copying where links exist."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: a copy, put in place atomically
        with atomic_output(dst, overwrite=False) as tmp:
            tmp.write_bytes(src.read_bytes())


def recover_unfinished(folder: str | os.PathLike) -> list[RecordingFiles]:
    """Finish the recordings a crash or ``kill -9`` left in ``folder`` (live ones, locked, are left alone).

    Each partial WAV is cut to what its header counts, the transcript lines read up to the first broken
    one, and the four files written as :meth:`ConversationRecorder.finish` would have.
    """
    folder = Path(folder).expanduser()
    done = []
    for wav_part in sorted(folder.glob(f"{STEM}-*-{PARTIAL_SUFFIXES[0]}")):
        stem = wav_part.name[: -len(PARTIAL_SUFFIXES[0]) - 1]
        text_part = folder / f"{stem}-{PARTIAL_SUFFIXES[1]}"
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
                continue  # not one of ours: not touched
            f.truncate(HEADER_BYTES + int.from_bytes(head[40:44], "little"))  # a write the kill cut short
            pieces = _read_pieces(text_part)
            started = _stem_time(stem) or datetime.fromtimestamp(wav_part.stat().st_mtime).astimezone()
            done.append(_finalise(
                folder, stem, (wav_part, text_part), started, pieces, int.from_bytes(head[24:28], "little"),
                {"recovered": "finished after the recording process ended without closing it (crash or kill)"},
            ))
    return done


def _in_time_order(pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Both speakers merged by time. Moshi's pieces keep the order they came in (their own stream's order);
    the user's words, which come late and in batches (the STT model's delay), are placed among them by time."""
    moshi = [p for p in pieces if p.get("speaker", MOSHI) == MOSHI]
    others = sorted((p for p in pieces if p.get("speaker", MOSHI) != MOSHI), key=lambda p: p["t"])
    merged: list[dict[str, Any]] = []
    i = 0
    for piece in moshi:
        while i < len(others) and others[i]["t"] < piece["t"]:
            merged.append(others[i])
            i += 1
        merged.append(piece)
    return merged + others[i:]


def _words_of(pieces: list[dict[str, Any]], speaker: str) -> str:
    """One speaker's words (a piece without `speaker`, as older recordings wrote them, is Moshi's)."""
    return "".join(p["text"] for p in pieces if p.get("speaker", MOSHI) == speaker).strip()


def _dialogue(pieces: list[dict[str, Any]]) -> str:
    """Both speakers as turns, in time order: `[12.3 s] you: ...` lines, one per change of speaker."""
    lines: list[str] = []
    speaker = None
    for p in pieces:
        who = p.get("speaker", MOSHI)
        if who != speaker:
            lines.append(f"[{p['t']:.1f} s] {who}:")
            speaker = who
        lines[-1] += p["text"] if lines[-1][-1] != ":" else " " + p["text"].lstrip()
    return "\n".join(line.rstrip() for line in lines)


def _read_pieces(path: Path) -> list[dict[str, Any]]:
    pieces = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return pieces
    for line in lines:
        try:
            piece = json.loads(line)
            read = {"t": float(piece["t"]), "text": str(piece["text"]), "speaker": str(piece.get("speaker", MOSHI))}
            if piece.get("end") is not None:
                read["end"] = float(piece["end"])
            pieces.append(read)
        except (ValueError, KeyError, TypeError):
            break  # the last line, cut short by the kill
    return pieces


def _stem_time(stem: str) -> datetime | None:
    try:
        return datetime.strptime(stem[len(STEM) + 1 : len(STEM) + 16], "%Y%m%d-%H%M%S").astimezone()
    except ValueError:
        return None
