"""The recorder writes as the conversation goes: readable files at every moment, a kill -9 loses under a
second, the next --record finishes what a crash left, and a normal end gives four whole files."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from moshi_mlx.audio.recording import (
    FLUSH_S,
    MAX_SKEW_S,
    ConversationRecorder,
    RecordingError,
    recover_unfinished,
)
from tests.helpers.audio_env import ROOT

SR = 24000
FRAME = 1920


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) as float in [-1, 1], shape (n, channels)."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getframerate() == SR
        ch = w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return data.reshape(-1, ch).astype(np.float32) / 32767.0, ch


def test_four_whole_files_and_never_over_an_existing_one(tmp_path):
    clock = iter([100.0, 100.5, 101.25, 102.0])
    rec = ConversationRecorder(tmp_path / "rec", clock=lambda: next(clock))
    you = (0.25 * np.sin(np.arange(3 * FRAME) / 7.0)).astype(np.float32)
    moshi = np.full(2 * FRAME, -0.5, np.float32)
    rec.add_user(you[:FRAME])
    rec.add_text(" Hello")           # 0.5 s after the first frame
    rec.add_moshi(moshi)
    rec.add_user(you[FRAME:])
    rec.add_text(" there.", t=0.16)  # an explicit time wins
    rec.add_text("")                 # nothing to record
    assert rec.seconds == pytest.approx(3 * FRAME / SR)
    first = rec.finish({"model": "demo"})

    other = ConversationRecorder(tmp_path / "rec")  # the same second: the next free name
    other.add_user(np.zeros(FRAME, np.float32))
    second = other.finish()
    names = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert len(names) == 8 and not any("partial" in n or n.startswith(".") for n in names), names
    assert set(first).isdisjoint(second)
    assert re.fullmatch(r"moshi-\d{8}-\d{6}-stereo\.wav", first.stereo.name)

    stereo, ch = read_wav(first.stereo)
    assert ch == 2 and stereo.shape == (3 * FRAME, 2)
    np.testing.assert_allclose(stereo[:, 0], you, atol=1 / 32767)                 # you: left
    np.testing.assert_allclose(stereo[: 2 * FRAME, 1], -0.5, atol=1 / 32767)      # Moshi: right
    assert not stereo[2 * FRAME :, 1].any()                                        # then silence
    mixed, ch = read_wav(first.mixed)
    assert ch == 1
    np.testing.assert_allclose(mixed[:, 0], np.clip(stereo.sum(axis=1), -1, 1), atol=2 / 32767)
    assert first.text.read_text() == "Hello there.\n"
    meta = json.loads(first.json.read_text())
    assert meta["pieces"] == [{"t": 0.5, "text": " Hello", "speaker": "moshi"},
                              {"t": 0.16, "text": " there.", "speaker": "moshi"}]  # Moshi's in the order they came
    assert meta["text"] == "Hello there." and meta["model"] == "demo" and meta["seconds"] == 0.24
    assert meta["files"]["stereo"] == first.stereo.name


def test_nothing_recorded_makes_no_file(tmp_path):
    assert ConversationRecorder(tmp_path).finish() is None
    assert list(tmp_path.iterdir()) == []


def test_the_files_are_readable_while_the_conversation_goes(tmp_path):
    rec = ConversationRecorder(tmp_path)
    for i in range(25):  # 2 s of both sides
        rec.add_user(np.full(FRAME, 0.1, np.float32))
        rec.add_moshi(np.full(FRAME, -0.1, np.float32))
    rec.add_text(" Hi", t=0.3)
    time.sleep(2 * FRAME_WAIT)
    wav_part, text_part = rec.partial_paths
    data, rate = sf.read(wav_part, dtype="float32")  # libsndfile takes it as it is, mid-recording
    assert rate == SR and data.shape == (25 * FRAME, 2)
    assert [json.loads(x) for x in text_part.read_text().splitlines()] == [{"t": 0.3, "text": " Hi", "speaker": "moshi"}]
    rec.add_moshi(np.zeros(int(3 * MAX_SKEW_S * SR), np.float32))  # Moshi's side runs ahead: not held forever
    time.sleep(2 * FRAME_WAIT)
    assert sf.info(str(wav_part)).frames >= 25 * FRAME + 2 * MAX_SKEW_S * SR
    files = rec.finish()
    assert not wav_part.exists() and not text_part.exists() and files.seconds == pytest.approx(2 + 3 * MAX_SKEW_S)


FRAME_WAIT = FLUSH_S + 0.2

#: A child feeding a recorder in real time (80 ms frames, a word a second) until it is killed.
FEEDER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from moshi_mlx.audio.recording import ConversationRecorder
    rec = ConversationRecorder(sys.argv[1])
    t0 = time.monotonic()
    for i in range(10_000):
        rec.add_user(np.full(1920, 0.2, np.float32))
        rec.add_moshi(np.full(1920, -0.2, np.float32))
        if i % 12 == 0:
            rec.add_text(f" w{i // 12}", t=i * 0.08)
        if i == 0:
            print("started", flush=True)
        time.sleep(max(0.0, t0 + (i + 1) * 0.08 - time.monotonic()))
""")


def test_kill_9_loses_under_a_second_and_the_next_record_finishes_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", FEEDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    t0 = time.monotonic()
    time.sleep(2.6)
    proc.send_signal(signal.SIGKILL)
    fed = time.monotonic() - t0  # at least this much audio was fed (one frame per 80 ms from t0)
    proc.wait(10)
    (wav_part,) = tmp_path.glob("*-stereo.partial.wav")
    data, _ = sf.read(wav_part, dtype="float32")  # readable as it was left
    assert fed - 1.0 <= data.shape[0] / SR <= fed + 0.2, (data.shape, fed)
    np.testing.assert_allclose(data, np.tile([0.2, -0.2], (len(data), 1)), atol=1e-4)

    (files,) = recover_unfinished(tmp_path)
    print(f"\nkill -9 after {fed:.2f} s fed: {files.seconds:.2f} s recovered")
    assert files.seconds == pytest.approx(data.shape[0] / SR)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)  # the partial ones are gone
    meta = json.loads(files.json.read_text())
    assert meta["recovered"] and [p["text"] for p in meta["pieces"]][:2] == [" w0", " w1"]
    assert recover_unfinished(tmp_path) == []


def test_a_live_recording_is_left_alone(tmp_path):
    rec = ConversationRecorder(tmp_path)
    rec.add_user(np.zeros(FRAME, np.float32))
    rec.add_moshi(np.zeros(FRAME, np.float32))
    time.sleep(FRAME_WAIT)
    assert rec.partial_paths[0].exists()
    assert recover_unfinished(tmp_path) == []  # locked by its writer
    files = rec.finish()
    assert sorted(tmp_path.iterdir()) == sorted(files)


def test_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rec = ConversationRecorder(blocker / "sub")
    rec.add_user(np.zeros(FRAME, np.float32))
    with pytest.raises(RecordingError, match=r"cannot write the recording \(.*Not a directory"):
        rec.finish()


#: A child that records 3 s (0.4 s, a pause, then the rest at once) into a folder under a file-size limit.
LIMITED = textwrap.dedent("""
    import resource, sys, time
    import numpy as np
    from moshi_mlx.audio.recording import ConversationRecorder, RecordingError
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    rec = ConversationRecorder(sys.argv[1], on_error=lambda line: print("on_error:", line, flush=True))
    for i in range(int(3 / 0.08)):
        rec.add_user(np.full(1920, 0.2, np.float32))
        rec.add_moshi(np.full(1920, -0.2, np.float32))
        if i == 4:
            time.sleep(1.0)  # the first 0.4 s go to disk in one block
    try:
        rec.finish()
    except RecordingError as e:
        print("finish:", e)
""")


def test_a_file_size_limit_stops_the_recording_with_one_line_and_keeps_what_fit(tmp_path):
    """`ulimit -f` reached half way: one line, no finished files, the partial WAV readable up to the limit."""
    limit = 100_000  # bytes: about half a second of 16-bit stereo
    r = subprocess.run([sys.executable, "-c", LIMITED, str(tmp_path), str(limit)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("on_error: the recording stopped: "), lines
    assert "File too large" in lines[0], lines
    assert lines[1].startswith("finish: ") and "the recording stopped after" in lines[1], lines
    assert "what was recorded stays in" in lines[1], lines
    (wav_part,) = tmp_path.glob("*-stereo.partial.wav")
    assert sorted(p.name for p in tmp_path.iterdir())[0].endswith("partial.wav")  # no finished file appeared
    assert not list(tmp_path.glob("*-stereo.wav")) and not list(tmp_path.glob("*.json"))
    data, _ = sf.read(wav_part, dtype="float32")
    assert data.shape == (5 * FRAME, 2)  # the block that fit, readable; the one that did not is absent
