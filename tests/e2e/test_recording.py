"""Conversation recording with the terminal app: `local --record DIR` ended by Ctrl-C (a real SIGINT) and by kill -9.

The recorder itself is tested in tests/unit/audio/test_recording.py."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np

from tests.helpers.apps import App, no_traceback, session_summary, talk
from tests.helpers.audio_env import JackServer, active_fraction, rms, speech_wav

SR = 24000


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) as float in [-1, 1], shape (n, channels)."""
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getframerate() == SR
        ch = w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return data.reshape(-1, ch).astype(np.float32) / 32767.0, ch


def test_record_flag_with_a_bad_folder_fails_before_loading(tmp_path):
    import subprocess
    import sys

    (tmp_path / "file").write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "moshi_mlx.local", "--demo", "--record", str(tmp_path / "file" / "sub")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: --record") and "cannot create the folder" in r.stderr
    assert "DEMO MODE" not in r.stderr


def test_terminal_app_saves_the_conversation_on_ctrl_c(jack_tools, tmp_path):
    """Real PortAudio on a JACK dummy server, spoken input, then SIGINT: the four files are written."""
    speech = speech_wav(tmp_path / "speech.wav", rate=SR, pad=(0.3, 0.3))
    out_dir = tmp_path / "recordings"
    with JackServer(SR, 1920, log_dir=tmp_path) as jack:
        app = App(["--demo", "--input-device", "system", "--output-device", "system", "--record", str(out_dir)],
                  jack.env)
        try:
            talk(jack, app, speech, tmp_path / "spk.wav", 5, SR)
            app.interrupt(timeout=30)
        finally:
            app.kill()
    err = app.stderr
    assert app.proc.returncode in (0, 130), err
    no_traceback(err)
    assert "recording saved" in err, err
    files = sorted(out_dir.iterdir())
    stereo_path = next(p for p in files if p.name.endswith("-stereo.wav"))
    stem = stereo_path.name[: -len("stereo.wav")]
    assert sorted(p.name for p in files) == sorted(stem + s for s in ("mixed.wav", "stereo.wav", "transcript.json",
                                                                       "transcript.txt"))

    stereo, ch = read_wav(stereo_path)
    s = session_summary(err)
    assert ch == 2
    # One 80 ms frame per tick on both sides: the length is the session's mic frames (within a frame or two).
    assert abs(stereo.shape[0] / 1920 - s["frames_in"]) <= 2, (stereo.shape, s)
    you, moshi = stereo[:, 0], stereo[:, 1]
    assert rms(you) > 0.01 and active_fraction(you, SR) > 0.2      # the spoken input, on the left
    assert rms(moshi) > 2e-4 and active_fraction(moshi, SR) > 0.2  # Moshi's babble, on the right
    mixed, ch = read_wav(stereo_path.with_name(stem + "mixed.wav"))
    assert ch == 1 and mixed.shape[0] == stereo.shape[0]

    text = stereo_path.with_name(stem + "transcript.txt").read_text().strip()
    meta = json.loads(stereo_path.with_name(stem + "transcript.json").read_text())
    assert text and " ".join(text.split()) == " ".join(app.stdout.split())  # what the terminal showed
    times = [p["t"] for p in meta["pieces"]]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= stereo.shape[0] / SR + 1.0
