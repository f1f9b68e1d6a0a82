"""Timed transcripts written out (moshi_mlx/captions.py): word lines, SubRip cues, JSON; the format by suffix."""

from __future__ import annotations

import json

import pytest

from moshi_mlx.captions import CaptionError, cues, format_of, render
from moshi_mlx.transcribe import Word

WORDS = [Word("hello", 0.0, 0.4), Word("there", 0.4, 0.9), Word("again", 2.0, 2.5), Word("x", 3661.25, 3661.25)]


def test_format_by_suffix_and_one_line_refusal():
    assert [format_of(f"t{s}") for s in (".json", ".TXT", ".srt")] == [".json", ".txt", ".srt"]
    with pytest.raises(CaptionError, match=r"t\.doc: the format is chosen by the suffix") as err:
        format_of("t.doc")
    assert "\n" not in str(err.value)


def test_cues_split_at_pauses_and_limits():
    assert [[w.text for w in c] for c in cues(WORDS)] == [["hello", "there"], ["again"], ["x"]]
    many = [Word(f"w{i}", i * 0.1, i * 0.1 + 0.1) for i in range(30)]
    assert [len(c) for c in cues(many)] == [12, 12, 6]
    slow = [Word(f"w{i}", i * 0.7, i * 0.7 + 0.6) for i in range(10)]
    assert all(c[-1].end - c[0].start <= 4.0 for c in cues(slow))


def test_srt_txt_and_json():
    srt = render(WORDS, ".srt")
    assert srt.splitlines()[:3] == ["1", "00:00:00,000 --> 00:00:00,900", "hello there"]
    assert "3\n01:01:01,250 --> 01:01:01,251\nx\n" in srt  # a zero-length word still gets a visible cue
    assert render(WORDS, ".txt").splitlines()[0].split() == ["0.00", "0.40", "hello"]
    data = json.loads(render(WORDS, ".json", {"input": "a.wav"}))
    assert data["input"] == "a.wav" and data["text"] == "hello there again x"
    assert data["words"][1] == {"text": "there", "start": 0.4, "end": 0.9}
