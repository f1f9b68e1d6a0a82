"""A timed transcript (`transcribe.Word`s) written out: plain lines, SubRip subtitles or JSON, chosen by suffix."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import MoshiError
from .transcribe import Word

#: The transcript formats, by file suffix.
FORMATS = (".json", ".txt", ".srt")
#: A subtitle cue ends at a pause this long, or when it would grow past this many words or seconds.
CUE_PAUSE_S, CUE_MAX_WORDS, CUE_MAX_S = 0.8, 12, 4.0


class CaptionError(MoshiError, ValueError):
    """A transcript path whose format is unknown; one line."""


def format_of(path: str | Path) -> str:
    """The format of a transcript path (its suffix), refused in one line if unknown."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise CaptionError(f"--transcript {path}: the format is chosen by the suffix, one of {', '.join(FORMATS)}")
    return suffix


def word_line(word: Word) -> str:
    """One word on one line: start and end in seconds, then the word."""
    return f"{word.start:8.2f} {word.end:8.2f}  {word.text}"


def cues(words: Iterable[Word]) -> list[list[Word]]:
    """Words grouped into subtitle cues: split at pauses and at the length limits."""
    out: list[list[Word]] = []
    for word in words:
        last = out[-1] if out else None
        if (last is None or word.start - last[-1].end >= CUE_PAUSE_S or len(last) >= CUE_MAX_WORDS
                or word.end - last[0].start > CUE_MAX_S):
            out.append([word])
        else:
            last.append(word)
    return out


def _srt_time(seconds: float) -> str:
    ms = max(0, round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def srt(words: Iterable[Word]) -> str:
    blocks = []
    for i, cue in enumerate(cues(words), 1):
        end = max(cue[-1].end, cue[0].start + 0.001)  # a cue needs some length to be shown
        blocks.append(f"{i}\n{_srt_time(cue[0].start)} --> {_srt_time(end)}\n{' '.join(w.text for w in cue)}\n")
    return "\n".join(blocks)


def render(words: list[Word], fmt: str, meta: Mapping[str, Any] | None = None) -> str:
    """The transcript in `fmt` (".json", ".txt", ".srt"); `meta` adds fields to the JSON."""
    if fmt == ".txt":
        return "".join(word_line(w) + "\n" for w in words)
    if fmt == ".srt":
        return srt(words)
    data = {**(meta or {}), "words": [{"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3)}
                                      for w in words],
            "text": " ".join(w.text for w in words)}
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"
