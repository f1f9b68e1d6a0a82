"""`kill -9` in the middle of a recorded conversation: the files on disk are readable as they are and hold all
but the last second, and the next `--record` into the folder finishes them into the four usual files.

The terminal app (`local --demo`) and the client (against a stand-in server that says a word a second) run on a
private JACK dummy server, so both voices come at the real 80 ms pace; the expected length is the time from
the app's "listening" line to the kill.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from aiohttp import web

from moshi_mlx.audio.recording import recover_unfinished
from moshi_mlx.net import protocol
from tests.helpers.apps import App
from tests.helpers.audio_env import ROOT, JackServer
from tests.helpers.ws_peer import start_peer

SR = 24000
LISTENING = "listening: speak to Moshi"
#: How long the conversation runs before the kill, once listening.
RUN_S = 4.0


def _listening_since(app: App, timeout: float) -> float:
    """The arrival time of the app's "listening" line (the recording starts with it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, chunk in list(app.err):
            if LISTENING in chunk:
                return t
        if app.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"never listened:\n{app.stderr}")


def _kill_and_check(app: App, folder: Path, since: float, what: str) -> float:
    """SIGKILL after RUN_S of listening; the partial WAV must hold all but the last second. Returns the seconds."""
    time.sleep(max(0.0, since + RUN_S - time.monotonic()))
    app.proc.send_signal(signal.SIGKILL)
    ran = time.monotonic() - since
    app.proc.wait(10)
    (wav_part,) = folder.glob("*-stereo.partial.wav")
    data, rate = sf.read(wav_part, dtype="float32")  # readable as the kill left it
    on_disk = data.shape[0] / rate
    files = recover_unfinished(folder)
    assert len(files) == 1 and sorted(folder.iterdir()) == sorted(files[0]), list(folder.iterdir())
    meta = json.loads(files[0].json.read_text())
    print(f"\n{what}: killed {ran:.2f} s after listening; {on_disk:.2f} s on disk, {files[0].seconds:.2f} s recovered")
    # "listening" is printed just before the streams start: the recording is at most a few frames shorter than
    # that, and loses at most the last second (FLUSH_S plus the writer's wake-up) to the kill.
    assert ran - 1.3 <= files[0].seconds <= ran + 0.1, (ran, files[0].seconds)
    assert files[0].seconds == on_disk and meta["recovered"] and meta["seconds"] == round(on_disk, 3)
    return files[0].seconds


def test_kill_9_of_the_terminal_app(jack_tools, tmp_path):
    folder = tmp_path / "rec"
    with JackServer(SR, 1920, log_dir=tmp_path) as jack:
        app = App(["--demo", "--input-device", "system", "--output-device", "system", "--no-aec", "--record",
                   str(folder)], jack.env)
        try:
            since = _listening_since(app, 120)
            seconds = _kill_and_check(app, folder, since, "local --demo")
        finally:
            app.kill()
    stereo, _ = sf.read(next(folder.glob("*-stereo.wav")), dtype="float32")
    assert stereo.shape == (round(seconds * SR), 2)


@pytest.mark.asyncio
async def test_kill_9_of_the_client(jack_tools, tmp_path):
    folder = tmp_path / "rec"

    async def handler(request):  # a stand-in server: a word a second, Moshi's audio left out (silence)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(protocol.encode_handshake())
        for i in range(60):
            await ws.send_bytes(protocol.encode_text(f" w{i}"))
            await asyncio.sleep(1.0)
        return ws

    runner, url = await start_peer(handler)
    try:
        with JackServer(SR, 1920, log_dir=tmp_path) as jack:
            app = App([f"{url}/api/chat", "--input-device", "system", "--output-device", "system", "--no-aec",
                       "--record", str(folder)], jack.env, module="moshi_mlx.client")
            try:
                since = await asyncio.to_thread(_listening_since, app, 90)
                await asyncio.to_thread(_kill_and_check, app, folder, since, "client")
            finally:
                app.kill()
    finally:
        await runner.cleanup()
    meta = json.loads(next(folder.glob("*-transcript.json")).read_text())
    words = [p["text"] for p in meta["pieces"]]
    assert words[:2] == [" w0", " w1"] and len(words) >= RUN_S - 1, words  # the words up to the last second


def test_the_next_record_finishes_what_a_kill_left(tmp_path):
    """`--record DIR` says it finished the unfinished recording before anything else (bad device: exits there)."""
    folder = tmp_path / "rec"
    folder.mkdir()
    part = folder / "moshi-20260101-120000-stereo.partial.wav"
    sf.write(part, np.zeros((SR, 2), np.int16), SR, subtype="PCM_16")
    r = subprocess.run(
        [sys.executable, "-m", "moshi_mlx.local", "--demo", "--record", str(folder), "--input-device", "no-such-device"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert "recording: finished one an earlier session left unfinished (1.0 s)" in r.stderr, r.stderr
    assert (folder / "moshi-20260101-120000-stereo.wav").exists() and not part.exists()
