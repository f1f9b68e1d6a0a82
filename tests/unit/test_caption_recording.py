"""`--record` for live captions (moshi_mlx/caption_recording.py): real files in a temporary folder."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from moshi_mlx.audio.frames import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.audio.recording import FLUSH_S, RecordingError
from moshi_mlx.caption_recording import CaptionRecorder, recover_unfinished
from moshi_mlx.transcribe import Word


def feed(rec: CaptionRecorder, frames: int = 25) -> None:
    tone = (0.3 * np.sin(np.arange(FRAME_SIZE) / 5)).astype(np.float32)
    for i in range(frames):
        rec.add_user(tone)
        rec.add_vad((i + 1) * 0.08, (0.1, 0.2, 0.6 if i == 20 else 0.3, 0.4))
    rec.add_word(Word("hello", 0.24, 0.5))
    rec.add_word(Word("there", 0.5, 0.9))
    rec.add_turn_end(1.68)


def test_finish_writes_mic_text_and_json(tmp_path):
    rec = CaptionRecorder(tmp_path)
    feed(rec)
    files = rec.finish({"model": "stand-in"})
    assert files is not None and abs(files.seconds - 2.0) < 1e-6
    assert [p.name.split("-", 3)[-1] for p in files] == ["mic.wav", "transcript.txt", "transcript.json"]
    assert not list(tmp_path.glob("*.partial.*"))
    data = json.loads(files.json.read_text())
    assert [w["text"] for w in data["words"]] == ["hello", "there"] and data["text"] == "hello there"
    assert len(data["vad"]) == 25 and data["vad"][20] == [1.68, 0.1, 0.2, 0.6, 0.4]
    assert data["end_of_turn_detected_at"] == [1.68] and data["model"] == "stand-in"
    assert "head 2: 2 s" in data["vad_note"]
    assert files.text.read_text().split() == ["0.24", "0.50", "hello", "0.50", "0.90", "there"]
    assert files.mic.stat().st_size == 44 + 2 * 25 * FRAME_SIZE


def test_nothing_recorded_writes_nothing(tmp_path):
    assert CaptionRecorder(tmp_path).finish() is None
    assert list(tmp_path.iterdir()) == []


def test_what_a_crash_left_is_finished_next_time(tmp_path):
    """A recorder that never finishes (the process killed) leaves readable partial files; recovery finishes them,
    and leaves a live recording alone."""
    rec = CaptionRecorder(tmp_path)
    feed(rec)
    deadline = time.monotonic() + 5
    while not list(tmp_path.glob("*-events.partial.jsonl")) and time.monotonic() < deadline:
        time.sleep(FLUSH_S / 5)
    time.sleep(FLUSH_S * 2)
    assert recover_unfinished(tmp_path) == []  # alive: its WAV is locked
    rec._stop.set()  # the writer stops as a killed process would, the files left open
    rec._writer.join()
    rec._partial.lines.close()
    rec._partial.wav._f.close()  # closed without a last commit; the lock goes with the file, as when a process dies
    done = recover_unfinished(tmp_path)
    assert len(done) == 1 and abs(done[0].seconds - 2.0) < 1e-6
    data = json.loads(done[0].json.read_text())
    assert [w["text"] for w in data["words"]] == ["hello", "there"] and "recovered" in data
    assert not list(tmp_path.glob("*.partial.*"))


def test_an_unwritable_folder_is_one_line(tmp_path):
    folder = tmp_path / "gone"
    folder.write_text("a file, not a folder")
    rec = CaptionRecorder(folder)
    rec.add_user(np.zeros(FRAME_SIZE, np.float32))
    with pytest.raises(RecordingError) as err:
        rec.finish()
    assert "\n" not in str(err.value) and SAMPLE_RATE == 24000
