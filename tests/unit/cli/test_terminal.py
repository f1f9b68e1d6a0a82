"""moshi_mlx.cli.terminal.TerminalSession: the devices on one side, a fake far end on the other.

sounddevice is faked (``tests.helpers.audio_env.FakeSD``, clocked: a thread plays PortAudio's part) because
this machine has no sound card; the end-to-end tests (tests/e2e/) run the commands on real, virtual devices.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest

from moshi_mlx.audio import device_choice
from moshi_mlx.audio.device_choice import NoDefaultDevice
from moshi_mlx.cli import terminal
from moshi_mlx.cli.terminal import TerminalSession
from tests.helpers.audio_env import FakeSD

TONE = (0.3 * np.sin(2 * np.pi * 330 * np.arange(44100) / 44100)).astype(np.float32)  # device 0 runs at 44.1 kHz


class EchoFarEnd:
    """Plays back what it hears; says two words once it has heard ``frames`` frames."""

    def __init__(self, frames: int = 15, fail: BaseException | None = None) -> None:
        self.frames, self.fail = frames, fail
        self.session: TerminalSession | None = None
        self.listening = self.reached = self.closed = False
        self.heard: list[np.ndarray] = []

    def push(self, frame: np.ndarray) -> None:  # the fake PortAudio thread
        self.heard.append(frame.copy())
        self.session.play(frame)

    def loop(self) -> None:
        self.listening = self.reached = True
        self.session.start_listening()
        while len(self.heard) < self.frames:
            time.sleep(0.02)
            self.session.show_lag(40.0, 0, lambda dropped, lag_ms: f"dropped {dropped}")
        for word in (" hello", " there"):
            self.session.text(word)
        if self.fail is not None:
            raise self.fail

    def close(self) -> None:
        self.closed = True

    def counts(self) -> str:
        return f"{len(self.heard)} frames heard"

    def latencies(self) -> list[float]:
        return [10.0, 30.0]

    def recording_info(self) -> dict:
        return {"model": "echo"}


@pytest.fixture
def sd(monkeypatch):
    fake = FakeSD(clocked=True, mic=lambda i, n: np.resize(np.roll(TONE, -i * n), n))
    monkeypatch.setattr(device_choice, "sounddevice_module", lambda: fake)
    return fake


@pytest.fixture
def said(monkeypatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(terminal, "log", lines.append)
    return lines


def _args(tmp_path, **kw) -> argparse.Namespace:
    return argparse.Namespace(**{
        "record": str(tmp_path / "rec"), "no_aec": True, "aec_delay_ms": 120, "input_device": None,
        "output_device": None, "max_lag_frames": 4, **kw,
    })


def _open(tmp_path, far: EchoFarEnd, **kw) -> TerminalSession:
    far.session = TerminalSession(_args(tmp_path, **kw), far, no_sound_hint="try --demo")
    return far.session


def test_a_session_records_both_sides_and_sums_up(sd, said, tmp_path, capsys):
    far = EchoFarEnd()
    session = _open(tmp_path, far)
    assert said[0].startswith("mic: 0 'Built-in Microphone' (44100 Hz, resampled to 24 kHz)")
    assert said[0].endswith(", echo cancellation off")
    assert session.run(far.loop, summary_on_error=False) == 0

    assert far.closed and not session.audio.active and all(not s.active for s in sd.streams)
    out, err = capsys.readouterr()
    assert out.split() == ["hello", "there"] and "listening: speak to Moshi" in err
    assert "[status] lag" in err  # not a tty: the status line about once a second
    summary = said[-1]
    assert summary.startswith("session: ") and f"{len(far.heard)} frames heard" in summary
    assert "latency median 20 ms / max 30 ms" in summary and "stopped by" not in summary
    assert any(line.startswith("recording saved (") for line in said), said
    text = next((tmp_path / "rec").glob("*-transcript.txt")).read_text()
    assert "hello there" in text


def test_ctrl_c_is_a_normal_end_with_the_interrupted_exit_code(sd, said, tmp_path):
    far = EchoFarEnd(frames=3, fail=KeyboardInterrupt())
    session = _open(tmp_path, far, record=None, max_lag_frames=2)
    assert session.run(far.loop, summary_on_error=False) == 130  # the README's policy: interrupted
    assert said[-1].endswith("(stopped by Ctrl-C)") and far.closed
    assert not any("recording" in line for line in said)


@pytest.mark.parametrize("summary_on_error", [False, True])
def test_a_failure_still_saves_the_recording(sd, said, tmp_path, summary_on_error):
    far = EchoFarEnd(frames=3, fail=RuntimeError("engine broke"))
    session = _open(tmp_path, far)
    with pytest.raises(RuntimeError, match="engine broke"):
        session.run(far.loop, summary_on_error=summary_on_error)
    assert far.closed and not session.audio.active
    assert any(line.startswith("recording saved (") for line in said)
    assert any(line.startswith("session: ") for line in said) == summary_on_error


def test_a_far_end_never_reached_is_not_summed_up(sd, said, tmp_path):
    far = EchoFarEnd()
    session = _open(tmp_path, far)
    session.run(lambda: None, summary_on_error=True)  # e.g. Ctrl-C before the first connection
    assert far.closed and len(said) == 1  # only the devices' line: no recording, no summary


def test_record_into_a_missing_folder_is_refused_not_created(tmp_path):
    """--record nodir/rec refuses as --demo-output does (it made nodir/ and nodir/rec/ for a typo)."""
    from moshi_mlx.audio.recording import RecordingError

    with pytest.raises(RecordingError, match=r"^--record .*nodir/rec: folder .*nodir does not exist$"):
        terminal.make_recorder(str(tmp_path / "nodir" / "rec"))
    assert not (tmp_path / "nodir").exists()
    assert terminal.make_recorder(str(tmp_path / "rec")) is not None and (tmp_path / "rec").is_dir()


def test_no_sound_card_gets_the_command_hint(sd, tmp_path):
    sd.default.device = [-1, -1]
    with pytest.raises(NoDefaultDevice, match=r"no default input device.*; or, try --demo$"):
        _open(tmp_path, EchoFarEnd())
    with pytest.raises(NoDefaultDevice) as e:
        TerminalSession(_args(tmp_path), EchoFarEnd(), no_sound_hint=None)
    assert "try --demo" not in str(e.value)


def test_a_microphone_of_exact_zeros_is_said_once_with_the_fix(monkeypatch, said, tmp_path, capsys):
    """macOS gives exact zeros until the terminal may use the microphone: one line names the fix (per platform)."""
    import sys

    fake = FakeSD(clocked=True)  # its microphone gives zeros
    monkeypatch.setattr(device_choice, "sounddevice_module", lambda: fake)
    monkeypatch.setattr(sys, "platform", "darwin")
    far = EchoFarEnd(frames=int(3.5 / 0.08))
    session = _open(tmp_path, far, record=None)
    session.run(far.loop, summary_on_error=False)
    err = capsys.readouterr().err
    assert err.count("warning: the microphone gives only silence (exact zeros for 3 s): allow the microphone for "
                     "your terminal app in System Settings → Privacy & Security → Microphone") == 1, err


def test_a_live_microphone_is_never_called_silent(sd, said, tmp_path, capsys):
    far = EchoFarEnd(frames=int(3.5 / 0.08))
    session = _open(tmp_path, far, record=None)
    session.run(far.loop, summary_on_error=False)
    assert "silence" not in capsys.readouterr().err and not session.audio.silence.silent
