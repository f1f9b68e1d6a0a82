"""`python -m moshi_mlx.local --demo` end to end, as a user runs it, through real PortAudio streams.

The sound devices are virtual (no sound card here): a private JACK server on the dummy driver gives
real-time 80 ms ticks; the "microphone" is espeak-ng speech played into the app's input port with
jack-play and the "speaker" is recorded with jack-record. The model is the tiny random demo model
(it babbles), which is what makes this testable with no download.

CPU is scarce on the test machines (the demo frame costs ~35 ms LM + ~75 ms Mimi, shared with other
jobs), so the app really falls behind and drops frames; the tests assert what holds regardless:
bounded latency, drops reported, streams running at real time, clean Ctrl-C.
The lag test makes the LM artificially slow by wrapping ConversationEngine.step in the child
process (a test-only wrapper; the product has no such hook).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.apps import FRAME_S, App, no_traceback, session_summary, status_lines, talk  # noqa: E402
from tests.helpers.audio_env import (
    ROOT,
    JackServer,
    active_fraction,
    alsa_file_env,
    base_env,
    read_wav,
    rms,
    speech_wav,
)


def test_conversation_over_jack_realtime(jack_tools, tmp_path):
    """Speech in, babble out, transcript live on stdout, then Ctrl-C: within ~1 s, exit 0, no traceback."""
    speech = speech_wav(tmp_path / "speech.wav", rate=24000, pad=(0.5, 0.5))  # ~6 s
    with JackServer(24000, 1920, log_dir=tmp_path) as jack:
        app = App(["--demo", "--input-device", "system", "--output-device", "system"], jack.env)
        try:
            talk(jack, app, speech, tmp_path / "spk.wav", 6, 24000)
            n_pieces_before_stop = len(app.stdout.split())
            sig_at = time.monotonic()
            took = app.interrupt()
        finally:
            app.kill()
    err = app.stderr
    assert app.proc.returncode in (0, 130), err
    assert took < 1.5, f"exit took {took:.2f} s after SIGINT"
    no_traceback(err)
    assert "DEMO MODE" in err
    m = re.search(r"ready in ([\d.]+) s \(load ([\d.]+) s, warm-up ([\d.]+) s\)", err)
    assert m, err
    assert "mic: 1 'system' (24000 Hz)" in err and "resampled" not in err

    # transcript: pieces arrived while the conversation ran, not only at the end
    assert n_pieces_before_stop >= 5, app.stdout
    first_piece_at = next(t for t, c in app.out if c.strip())
    assert first_piece_at < sig_at - 2.0

    # the speaker stream ran at real time: 6 s of 24 kHz audio recorded, Moshi's babble in it
    out, rate = read_wav(tmp_path / "spk.wav")
    assert rate == 24000 and abs(out.size / rate - 6.0) < 0.5
    assert rms(out) > 2e-4 and active_fraction(out, rate) > 0.3, "speaker output is (nearly) silent"
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0

    s = session_summary(err)
    print(f"\nSIGINT -> exit {took:.2f} s; {m.group(0)}; {s}")
    # mic callbacks kept real-time pace for the whole session (one 80 ms frame per tick)
    assert s["frames_in"] >= 0.85 * (s["seconds"] / FRAME_S) - 5, s
    assert s["answered"] + s["dropped"] <= s["frames_in"] and s["answered"] > 10, s
    assert s["lat_max"] is not None and s["lat_max"] < 3000, s  # bounded (max_pending 3 by default)
    if s["dropped"]:
        assert "moshi is behind real time: skipped" in err


def test_lag_is_bounded_and_reported_with_a_slow_model(jack_tools, tmp_path):
    """LM step made 250 ms slower than it is (3x over the 80 ms budget): frames are dropped, the user
    is told, and latency stays bounded instead of growing with the session."""
    slow = (
        "import time\nfrom moshi_mlx import engine\n_step = engine.ConversationEngine.step\n"
        "def slow_step(self, codes):\n    time.sleep(0.25)\n    return _step(self, codes)\n"
        "engine.ConversationEngine.step = slow_step\n"
    )
    speech = speech_wav(tmp_path / "speech.wav", rate=24000, pad=(0.5, 2.5))  # ~8 s
    with JackServer(24000, 1920, log_dir=tmp_path) as jack:
        app = App(
            ["--demo", "--input-device", "system", "--output-device", "system", "--max-lag-frames", "2"],
            jack.env, prelude=slow,
        )
        try:
            talk(jack, app, speech, tmp_path / "spk.wav", 8, 24000)
            app.interrupt()
        finally:
            app.kill()
    err = app.stderr
    assert app.proc.returncode in (0, 130), err
    no_traceback(err)
    s = session_summary(err)
    print("\n" + "\n".join(ln for ln in err.splitlines() if "status" in ln or "session" in ln or "behind" in ln))
    # at most one frame per 0.25 s gets through; the rest must have been dropped, and said so
    assert s["answered"] <= s["seconds"] / 0.25 + 3, s
    assert s["dropped"] >= 0.4 * s["frames_in"], s
    assert "moshi is behind real time: skipped" in err
    # bounded: inbox of 2 frames + 3 stages, each frame ~0.3 s or more here -> well under 4 s
    assert s["lat_max"] < 4000, s
    status = status_lines(err)
    assert len(status) >= 4, err
    later = [st["lag"] for st in status[len(status) // 2 :]]
    assert max(later) < 4000, status  # not growing with the session
    assert status[-1]["dropped"] > status[0]["dropped"]
    out, rate = read_wav(tmp_path / "spk.wav")
    assert active_fraction(out, rate) > 0.1  # Moshi still speaks (with gaps where frames were skipped)


def test_resampled_device_48k(jack_tools, tmp_path):
    """A JACK server at 48 kHz accepts only 48 kHz: the app opens it at 48 kHz with 3840-sample blocks
    and resamples both directions."""
    speech = speech_wav(tmp_path / "speech.wav", text="Hello there, can you hear me?", rate=48000, pad=(0.2, 0.5))
    with JackServer(48000, 3840, log_dir=tmp_path) as jack:
        app = App(["--demo", "--input-device", "system", "--output-device", "system"], jack.env)
        try:
            talk(jack, app, speech, tmp_path / "spk.wav", 4, 48000)
            app.interrupt()
        finally:
            app.kill()
    err = app.stderr
    assert app.proc.returncode in (0, 130), err
    no_traceback(err)
    assert "mic: 1 'system' (48000 Hz, resampled to 24 kHz)" in err
    out, rate = read_wav(tmp_path / "spk.wav")
    assert rate == 48000 and abs(out.size / rate - 4.0) < 0.5
    assert rms(out) > 2e-4 and active_fraction(out, rate) > 0.3
    s = session_summary(err)
    assert s["frames_in"] >= 0.85 * (s["seconds"] / FRAME_S) - 5, s  # 24 kHz frames at real-time pace
    assert s["answered"] > 5


# ------------------------------------------------------------------------------------------------
# Errors and device listing (no model load needed: devices are checked first)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def alsa_env(portaudio, tmp_path):
    np.zeros(1920 * 4, np.float32).tofile(tmp_path / "mic.f32")
    return alsa_file_env(tmp_path / "home", tmp_path / "mic.f32", tmp_path / "spk.raw")


def _run(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moshi_mlx.local", *args], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )


def test_list_devices(alsa_env):
    r = _run(["--list-devices"], alsa_env)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s*[>< ]*\s*\d+ fakemic_raw \(ALSA; \d+ in, \d+ out; \d+ Hz\)$", r.stdout, re.M), r.stdout
    assert "fakespk_raw" in r.stdout and "(> default input, < default output)" in r.stdout
    assert r.stderr == ""


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["--input-device", "nonexistent"],
            "error: --input-device 'nonexistent': no such input device (see --list-devices)",
        ),
        (["--output-device", "999"], "error: --output-device 999: no such device"),
    ],
)
def test_device_errors_are_one_line(alsa_env, args, needle):
    r = _run(["--demo", *args], alsa_env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(needle), r.stderr
    assert "DEMO MODE" not in r.stderr  # failed before loading anything


def test_model_file_error_is_one_line(alsa_env, tmp_path):
    r = _run(
        ["--input-device", "fakemic_raw", "--output-device", "fakespk_raw",
         "--moshi-weights", str(tmp_path / "nope.safetensors"), "--mimi-weights", str(tmp_path / "nope2.safetensors"),
         "--tokenizer", str(tmp_path / "nope.model")],
        alsa_env,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nope" in lines[-1], r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr  # only the error: checked before the devices open


def test_bad_max_lag_frames(alsa_env):
    r = _run(["--demo", "--max-lag-frames", "0"], alsa_env)
    assert r.returncode == 2 and "--max-lag-frames: must be >= 1, got '0'" in r.stderr


# ------------------------------------------------------------------------------------------------
# In process, with a clocked fake of sounddevice (no PortAudio; see audio_env.FakeSD)
# ------------------------------------------------------------------------------------------------


def test_in_process_session_resampled_and_no_stray_threads(monkeypatch, capsys):
    """The whole session in this process: device 2 only takes 48 kHz (resampled both ways), a thread
    plays the part of PortAudio's clock, Ctrl-C arrives as a real SIGINT; afterwards no thread of the
    session is left."""
    import signal as _signal

    from moshi_mlx import cli, local
    from moshi_mlx.audio import device_choice
    from moshi_mlx.cli.shell import EXIT_INTERRUPTED
    from tests.helpers.audio_env import FakeSD

    t = np.arange(3840 * 200) / 48000
    voice = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    sd = FakeSD(clocked=True, mic=lambda i, n: np.resize(voice[i * n : (i + 1) * n], n))
    monkeypatch.setattr(device_choice, "sounddevice_module", lambda: sd)
    before = set(threading.enumerate())
    stop_after = 40  # callbacks (3.2 s of audio) once the stream runs

    def interrupter():
        while not (sd.streams and sd.streams[0].active and len(sd.streams[0].output) >= stop_after):
            time.sleep(0.02)
        _signal.raise_signal(_signal.SIGINT)

    watcher = threading.Thread(target=interrupter, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    rc = local.main(["--demo", "--input-device", "USB Headset", "--output-device", "2"])
    watcher.join(5)
    assert rc == EXIT_INTERRUPTED and time.monotonic() - t0 < 60  # Ctrl-C ended it: the shell's exit code
    leftover = [th.name for th in threading.enumerate() if th not in before and th.is_alive()]
    assert not leftover, leftover
    (stream,) = sd.streams  # one duplex stream at 48 kHz, 80 ms blocks
    assert (stream.kind, stream.samplerate, stream.blocksize, stream.active) == ("duplex", 48000, 3840, False)
    out = np.concatenate(stream.output)
    assert active_fraction(out, 48000) > 0.3
    cap = capsys.readouterr()
    assert "(48000 Hz, resampled to 24 kHz)" in cap.err and "session:" in cap.err and "stopped by Ctrl-C" in cap.err
    assert len(cap.out.split()) >= 5  # transcript pieces
    assert _signal.getsignal(_signal.SIGTERM) is not cli.shell.raise_interrupt  # handler restored


def test_tty_display(monkeypatch):
    """On a terminal: live words + lag indicator on one redrawn stderr line; full lines to stdout."""
    import io

    from moshi_mlx.cli.display import Display

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out, err = Tty(), Tty()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: os.terminal_size((60, 20)))
    d = Display()
    assert d.tty
    d.set_status("lag  120 ms | dropped 0 | underruns 0", 0.0)
    for w in [" hello"] + [" word"] * 12:
        d.text(w)
    d.message("moshi is behind real time: skipped 3 of your frames")
    d.finish()
    lines = out.getvalue().splitlines()
    assert " ".join(lines) == "hello" + " word" * 12 and len(lines) >= 2 and all(len(ln) < 60 for ln in lines)
    assert "\r\x1b[K" in err.getvalue() and "[lag  120 ms" in err.getvalue()
    assert "moshi is behind real time" in err.getvalue()


def test_engine_failure_mid_session_is_one_line(monkeypatch, capsys):
    """Mimi failing inside the engine thread (simulated: decode raises MimiError on its 5th frame)
    ends the session with one error line and exit code 1, streams and threads closed."""
    from moshi_mlx import local
    from moshi_mlx.audio import device_choice
    from moshi_mlx.audio.mimi_pool import MimiError
    from moshi_mlx.engine import ConversationEngine
    from tests.helpers.audio_env import FakeSD

    sd = FakeSD(clocked=True)
    sd.rates[2] = {24000}
    monkeypatch.setattr(device_choice, "sounddevice_module", lambda: sd)
    calls = {"n": 0}
    real_decode = ConversationEngine.decode

    def failing_decode(self, out):
        calls["n"] += 1
        if calls["n"] == 13:  # well after the warm-up (4 frames) and a few live frames
            raise MimiError("rustymimi failed: index-select invalid index")
        return real_decode(self, out)

    monkeypatch.setattr(ConversationEngine, "decode", failing_decode)
    before = set(threading.enumerate())
    rc = local.main(["--demo", "--input-device", "2", "--output-device", "2"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.strip().splitlines()[-1] == "error: rustymimi failed: index-select invalid index", err
    assert "Traceback" not in err and not sd.streams[0].active
    assert not [th.name for th in threading.enumerate() if th not in before and th.is_alive()]


def test_offline_demo_applies_the_sampling_flags(tmp_path):
    """No default sound device (a HOME without an ALSA setup, on a machine without a sound card):
    `local --demo` runs offline, with the flags."""
    env = base_env(HOME=str(tmp_path))
    out = tmp_path / "babble.wav"
    r = _run(
        ["--demo", "--demo-output", str(out), "--text-seed", "1", "--audio-seed", "2", "--pad-mult", "40",
         "--repetition-penalty", "1.2", "--repetition-penalty-context", "32"],
        env, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "no usable sound device" in r.stderr and out.is_file()
    # The babbling demo says a "word" nearly every frame; with padding e^40 times likelier it says none.
    assert "demo done: 0 transcript pieces" in r.stderr, r.stderr


def test_bad_sampling_flag_is_rejected_before_loading(tmp_path):
    r = _run(["--demo", "--pad-mult", "inf"], base_env(HOME=str(tmp_path)), timeout=60)
    assert r.returncode == 2 and "argument --pad-mult: pad_mult must be a finite number" in r.stderr.splitlines()[-1]
    assert "DEMO MODE" not in r.stderr


# ------------------------------------------------------------------------------------------------
# A newcomer's first runs: no sound card, the demo's WAV, what stopped the session
# ------------------------------------------------------------------------------------------------

NO_SOUND_HINT = (
    "without a sound card, try `python -m moshi_mlx.local --demo` or answer a recording with "
    "`python -m moshi_mlx.run_inference in.wav out.wav`"
)


def test_no_sound_card_says_what_to_do_instead(portaudio, tmp_path, demo_files):
    """A HOME without an ALSA setup on a machine without a sound card: PortAudio sees no device. The model
    files are checked first (they are, here: a tiny random LM), so the devices' error is the one left."""
    from moshi_mlx.model_files.stand_ins import write_random_lm
    from moshi_mlx.models.config import config_tiny

    weights, config = write_random_lm(config_tiny(), None, tmp_path)
    env = base_env(HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    files = ["--moshi-weights", str(weights), "--lm-config", str(config), "--mimi-weights", str(demo_files.mimi_path),
             "--tokenizer", str(demo_files.tokenizer_path)]
    r = _run(files, env, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: no microphone found (no default input device)") and NO_SOUND_HINT in r.stderr
    r = _run(["-q", "4"], env, timeout=60)  # offline, not cached: the model is the problem, said before devices
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "model.q4.safetensors" in r.stderr, r.stderr
    assert "--demo" in r.stderr and "microphone" not in r.stderr, r.stderr
    r = _run(["--list-devices"], env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"no sound devices found (PortAudio sees none); {NO_SOUND_HINT}"


def _peak_dbfs(path: Path) -> float:
    pcm, rate = read_wav(path)
    assert rate == 24000 and pcm.size > 24000
    return float(20 * np.log10(np.abs(pcm).max()))


def test_offline_demo_writes_a_fresh_audible_file_and_never_overwrites(portaudio, tmp_path):
    """No sound card: `local --demo` writes its babble to a new dated file in the current folder, loud
    enough to hear (it peaked at -46 dBFS once); an existing --demo-output is refused before any work."""
    env = base_env(HOME=str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    mine = work / "mine.wav"
    mine.write_bytes(b"the user's file")

    def local(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moshi_mlx.local", *args], env=env, cwd=work,
                              capture_output=True, text=True, timeout=timeout)

    r = local("--demo", "--demo-output", "mine.wav", timeout=60)
    assert r.returncode == 1 and r.stderr == (
        "error: --demo-output mine.wav: exists; the demo never replaces a file (remove it or pick a new name)\n")
    assert mine.read_bytes() == b"the user's file"
    r = local("--demo-output", "x.wav", timeout=60)
    assert r.returncode == 2 and r.stderr == "error: --demo-output only applies with --demo\n", r.stderr

    r = local("--demo", "--text-seed", "1", "--audio-seed", "2")
    assert r.returncode == 0, r.stderr
    (made,) = [p for p in work.iterdir() if p != mine]
    assert re.fullmatch(r"moshi-demo-\d{8}-\d{6}\.wav", made.name), made
    assert f"written to {made.name}" in r.stderr.strip().splitlines()[-1], r.stderr
    peak = _peak_dbfs(made)
    print(f"\noffline demo babble peaks at {peak:.1f} dBFS")
    assert -15.0 <= peak <= -3.0, peak
    assert sorted(p.name for p in work.iterdir()) == sorted([made.name, "mine.wav"])  # no temporary left


def test_sigterm_is_named_and_a_silent_mic_claims_no_echo_removed(alsa_env):
    """SIGTERM ends a session like Ctrl-C (cleanly, exit 130: the README's "interrupted") and the summary says it was SIGTERM. On ALSA
    file devices the mic is a silent file with no acoustic path: there is no echo to measure, and the
    summary says so (it once claimed "116.1 dB removed")."""
    app = App(["--demo", "--input-device", "fakemic_raw", "--output-device", "fakespk_raw"], alsa_env)
    try:
        deadline = time.monotonic() + 180
        while "listening" not in app.stderr and app.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "listening" in app.stderr, app.stderr
        time.sleep(3.0)
        app.proc.send_signal(signal.SIGTERM)
        assert app.proc.wait(30) == 130, app.stderr
        for t in app._threads:
            t.join(5)
    finally:
        app.kill()
    err = app.stderr
    no_traceback(err)
    print("\n" + "\n".join(ln for ln in err.splitlines() if ln.startswith(("echo cancellation", "session:"))))
    assert "(stopped by SIGTERM)" in err and "Ctrl-C)" not in err, err
    assert session_summary(err)["frames_in"] > 0
    if "echo cancellation on" in err:
        assert "echo cancellation: no echo to measure" in err and "dB removed" not in err, err


def test_a_silent_virtual_microphone_is_said_with_the_fix(jack_tools, tmp_path):
    """JACK's dummy capture gives exact zeros, as macOS does before the terminal may use the microphone: after
    3 s one warning line names the fix (this platform's words), and the session goes on."""
    with JackServer(24000, 1920, log_dir=tmp_path) as jack:
        app = App(["--demo", "--no-aec", "--input-device", "system", "--output-device", "system"], jack.env)
        try:
            deadline = time.monotonic() + 180
            while "listening" not in app.stderr and app.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            listening_at = time.monotonic()
            while "gives only silence" not in app.stderr and time.monotonic() - listening_at < 20:
                time.sleep(0.2)
            said_after = time.monotonic() - listening_at
            app.interrupt()
        finally:
            app.kill()
    err = app.stderr
    no_traceback(err)
    assert err.count("warning: the microphone gives only silence (exact zeros for 3 s): check that the input is not "
                     "muted (alsamixer or pavucontrol)") == 1, err
    assert 2.5 < said_after < 10, said_after
    assert app.proc.returncode == 130, err
