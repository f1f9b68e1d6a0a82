"""Echo cancellation in the terminal app, end to end through real PortAudio streams on JACK.

The app's speaker port is wired straight back into its microphone port: the acoustic echo path of a
laptop without headphones, as a pure one-period (80 ms) delay. With echo cancellation on, the app must
report a large reduction of what it hears of itself; with --no-aec it reports nothing.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.helpers.apps import App, no_traceback, session_summary
from tests.helpers.audio_env import JackServer


def _echo_session(tmp_path, extra_args):
    with JackServer(24000, 1920, log_dir=tmp_path) as jack:
        app = App(["--demo", "--input-device", "system", "--output-device", "system", *extra_args], jack.env)
        try:
            assert jack.wait_for_port("PortAudio:in_0", 90), app.stderr
            jack.disconnect("system:capture_1", "PortAudio:in_0")
            jack.connect("PortAudio:out_0", "PortAudio:in_0")  # the speaker is heard by the mic
            time.sleep(6)
            app.interrupt()
        finally:
            app.kill()
    return app.stderr


def test_echo_of_moshi_is_removed(jack_tools, tmp_path):
    err = _echo_session(tmp_path, [])
    no_traceback(err)
    assert "echo cancellation on" in err
    m = re.search(r"echo cancellation: (?:more than )?([-\d.]+) dB removed", err)  # "more than": below the floor
    assert m, err
    print(f"\nJACK echo loop: {m.group(0)}; {session_summary(err)}")
    assert float(m.group(1)) > 10.0, err


# By hand (13 s here): the flag's session; the echo-cancelling session itself runs in CI just above.
@pytest.mark.long
def test_no_aec_flag(jack_tools, tmp_path):
    err = _echo_session(tmp_path, ["--no-aec"])
    no_traceback(err)
    assert "echo cancellation off" in err and "dB removed" not in err
    assert session_summary(err)["frames_in"] > 20
