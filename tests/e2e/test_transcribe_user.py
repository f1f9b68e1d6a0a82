"""`--transcribe-user`: the user's words written down beside Moshi, through each front end's real entry point.

The STT model is the demo's tiny random stand-in (`--demo --transcribe-user`) or stand-in files in a folder
(a random `config_tiny_stt` checkpoint, the random Mimi, the 8000-piece stand-in tokenizer); random weights
give made-up words, so the tests check who said what and when (labels, times, order), not meaning.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from moshi_mlx.net import protocol
from tests.helpers.apps import App, no_traceback, session_summary
from tests.helpers.audio_env import ROOT, JackServer, base_env, speech_wav
from tests.helpers.web_process import LocalWeb
from tests.helpers.web_server import make_speech, opus_messages, stream

SR = 24000
SPEAK_S = 6.0  # seconds the app listens to the speech before Ctrl-C
LABEL = r"\[\s*(\d+\.\d) s\] (you|moshi):"


@pytest.fixture(scope="module")
def stt_folder(demo_files, tmp_path_factory) -> Path:
    """A local folder laid out as a published STT repo: config.json naming the three files beside it."""
    from moshi_mlx.model_files.stand_ins import write_random_lm, write_stand_in_tokenizer
    from moshi_mlx.models.config import config_tiny_stt

    root = tmp_path_factory.mktemp("stt-repo")
    weights, config_path = write_random_lm(config_tiny_stt(), None, root, seed=3)
    write_stand_in_tokenizer(root / "tok8000.model", 8000)
    config = json.loads(Path(config_path).read_text())
    config.update(moshi_name=Path(weights).name, mimi_name="mimi.safetensors", tokenizer_name="tok8000.model")
    (root / "mimi.safetensors").symlink_to(demo_files.mimi_path)
    (root / "config.json").write_text(json.dumps(config))
    return root


def speak_then_stop(jack: JackServer, app: App, speech: Path) -> None:
    """Once the app's microphone port exists: the speech into it alone, SPEAK_S seconds, then Ctrl-C.
    (No speaker recording: on a loaded 2-core machine jack-record fails where the app is fine.)"""
    import time

    assert jack.wait_for_port("PortAudio:in_0", 180), app.stderr
    jack.disconnect("system:capture_1", "PortAudio:in_0")
    jack.play_into(speech, "PortAudio:in_0")
    time.sleep(SPEAK_S)
    app.interrupt(timeout=90)


# ------------------------------------------------------------------------------------------------
# A bad REPO: one line, before anything loads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["moshi_mlx.local", "moshi_mlx.local_web", "moshi_mlx.client"])
def test_bad_repo_is_one_line_before_loading(module, tmp_path):
    demo = [] if module == "moshi_mlx.client" else ["--demo"]
    r = subprocess.run([sys.executable, "-m", module, *demo, "--transcribe-user", str(tmp_path / "nope")],
                       env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --transcribe-user {tmp_path / 'nope'}: no such folder (and not "
                                             "a hub repo id like kyutai/stt-1b-en_fr-mlx)"], r.stderr
    assert "DEMO MODE" not in r.stderr


def test_a_model_that_is_not_speech_to_text_is_refused(demo_files, tmp_path):
    """A folder holding a Moshi (not text-only) checkpoint: one line naming what is missing."""
    from moshi_mlx.model_files.stand_ins import write_random_lm, write_stand_in_tokenizer
    from moshi_mlx.models.config import config_tiny

    weights, config_path = write_random_lm(config_tiny(), None, tmp_path, seed=1)
    write_stand_in_tokenizer(tmp_path / "tok.model")
    config = json.loads(Path(config_path).read_text())
    config.update(moshi_name=Path(weights).name, mimi_name=str(demo_files.mimi_path), tokenizer_name="tok.model")
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "moshi_mlx.local", "--demo", "--transcribe-user", str(tmp_path)],
                       env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (f"error: --transcribe-user {tmp_path}: not a speech-to-text model (it needs dep_q 0 "
                                "and an stt_config)"), r.stderr


# ------------------------------------------------------------------------------------------------
# The terminal app on virtual audio devices, spoken input, --record
# ------------------------------------------------------------------------------------------------


def test_terminal_shows_and_records_both_speakers(jack_tools, tmp_path):
    """espeak-ng speech into the app's microphone (a JACK dummy server), then Ctrl-C: stdout has "you:" and
    "moshi:" lines with times; the recording's transcript holds both speakers' words in time order."""
    import re

    speech = speech_wav(tmp_path / "speech.wav", rate=SR, pad=(0.3, 0.3))
    out_dir = tmp_path / "rec"
    with JackServer(SR, 1920, log_dir=tmp_path) as jack:
        app = App(["--demo", "--transcribe-user", "--input-device", "system", "--output-device", "system",
                   "--record", str(out_dir)], jack.env)
        try:
            speak_then_stop(jack, app, speech)
        finally:
            app.kill()
    err, out = app.stderr, app.stdout
    assert app.proc.returncode == 130, err
    no_traceback(err)
    memory_line = next(line for line in err.splitlines() if line.startswith("memory:"))
    assert "STT for your words (demo stand-in: tiny random STT)" in memory_line, memory_line
    labels = re.findall(LABEL, out)
    assert {who for _, who in labels} == {"you", "moshi"}, out
    summary = session_summary(err)
    assert summary["frames_in"] > 0
    assert re.search(r"your words (\d+) \(STT skipped \d+ frames\)", err), err

    meta = json.loads(next(out_dir.glob("*-transcript.json")).read_text())
    pieces = meta["pieces"]
    assert [p["t"] for p in pieces] == sorted(p["t"] for p in pieces)  # both speakers, in time order
    yours = [p for p in pieces if p["speaker"] == "you"]
    moshis = [p for p in pieces if p["speaker"] == "moshi"]
    assert yours and moshis
    assert all(p["t"] <= p["end"] <= meta["seconds"] + 1.0 for p in yours)
    assert meta["user_text"] == "".join(p["text"] for p in yours).strip()
    assert meta["text"] == "".join(p["text"] for p in moshis).strip()  # old readers: Moshi's words as before
    dialogue = next(out_dir.glob("*-transcript.txt")).read_text()
    assert re.match(LABEL, dialogue), dialogue


# ------------------------------------------------------------------------------------------------
# local_web: the user's words on the WebSocket (0x08, on request); the client against it
# ------------------------------------------------------------------------------------------------


async def _user_words_over(url: str, speech, seconds: float = 8.0) -> list[dict]:
    """The 0x08 words a WebSocket client gets while it streams `speech`."""
    words: list[dict] = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url) as ws:
            first = await asyncio.wait_for(ws.receive(), 60)
            assert first.data == b"\x00"

            async def read() -> None:
                async for msg in ws:
                    m = protocol.decode(msg.data) if msg.type == aiohttp.WSMsgType.BINARY else None
                    if m is not None and m.kind == protocol.Kind.USER_WORDS:
                        words.extend(json.loads(m.payload)["words"])

            reader = asyncio.ensure_future(read())
            await stream(ws, opus_messages(speech), 0.04)
            await asyncio.sleep(seconds)
            reader.cancel()
    return words


def test_local_web_sends_the_user_words_to_a_client_that_asks(tmp_path):
    speech = make_speech(tmp_path)
    with LocalWeb(tmp_path / "web.log", ["--transcribe-user"]) as server:
        asked = asyncio.run(_user_words_over(server.ws + "?user_words=1", speech))
        server.wait_idle(30)
        not_asked = asyncio.run(_user_words_over(server.ws, speech[: SR * 2], seconds=3.0))
        log = server.log
    assert "STT for your words" in log, log
    assert asked, log[-2000:]
    assert all(set(w) == {"text", "start", "end"} and 0 <= w["start"] <= w["end"] for w in asked)
    assert [w["start"] for w in asked] == sorted(w["start"] for w in asked)
    assert not_asked == []  # Kyutai's client never asks: it never sees a kind it would throw on


# By hand (18 s here): the client runs the same UserTranscriber the terminal app's JACK test checks in CI.
@pytest.mark.long
def test_client_writes_down_your_words_against_local_web(jack_tools, stt_folder, tmp_path):
    """`client --transcribe-user FOLDER` against a plain `local_web --demo`: the STT runs in the client."""
    import re

    speech = speech_wav(tmp_path / "speech.wav", rate=SR, pad=(0.3, 0.3))
    with LocalWeb(tmp_path / "web.log") as server, JackServer(SR, 1920, log_dir=tmp_path) as jack:
        app = App([server.ws.rsplit("/api/chat", 1)[0], "--transcribe-user", str(stt_folder), "--input-device",
                   "system", "--output-device", "system", "--no-aec"], jack.env, module="moshi_mlx.client")
        try:
            speak_then_stop(jack, app, speech)
        finally:
            app.kill()
    err, out = app.stderr, app.stdout
    no_traceback(err)
    assert "your words: " in err and "STT for your words" in err, err
    assert "you" in {who for _, who in re.findall(LABEL, out)}, out


# ------------------------------------------------------------------------------------------------
# The benchmark: STT alone, and on top of Moshi
# ------------------------------------------------------------------------------------------------


def test_benchmark_times_stt_alone_and_on_top_of_moshi(tmp_path):
    def bench(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moshi_mlx.benchmark", *flags, "--steps", "4", "--warmup", "1",
                               "--no-progress", "--json", str(tmp_path / "b.json")],
                              env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)

    alone = bench("--stt-only", "--stt-size", "tiny", "--dtype", "float32")
    assert alone.returncode == 0, alone.stderr
    assert "STT tiny float32" in alone.stdout and " RTF" in alone.stdout
    row = json.loads((tmp_path / "b.json").read_text())["stt"][0]
    assert row["size"] == "tiny" and row["step"]["n"] == 4 and row["rtf"] > 0

    on_top = bench("--demo", "--transcribe-user", "--realtime-frames", "0", "--no-split")
    assert on_top.returncode == 0, on_top.stderr
    assert "--transcribe-user adds per frame" in on_top.stdout
    extra = json.loads((tmp_path / "b.json").read_text())["transcribe_user"]
    assert extra["alone"]["n"] == extra["with_stt"]["n"] == 4
    assert extra["extra_ms"] == pytest.approx(extra["with_stt"]["median_ms"] - extra["alone"]["median_ms"], abs=1e-2)


# By hand (38 s here): the offline demo's two speakers; the terminal app on JACK checks both speakers in --record
# in CI.
@pytest.mark.long
def test_offline_demo_records_both_speakers(tmp_path):
    """No sound device (a HOME without an ALSA setup): `local --demo --transcribe-user --record` writes the test
    signal's words beside Moshi's babble, in time order, and prints them as a "you:" line."""
    env = base_env(HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "moshi_mlx.local", "--demo", "--transcribe-user", "--record",
                        str(tmp_path / "rec"), "--demo-output", str(tmp_path / "babble.wav")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "no usable sound device" in r.stderr and "] you: " in r.stdout
    meta = json.loads(next((tmp_path / "rec").glob("*-transcript.json")).read_text())
    speakers = {p["speaker"] for p in meta["pieces"]}
    assert speakers == {"you", "moshi"} and meta["user_text"]
    assert [p["t"] for p in meta["pieces"]] == sorted(p["t"] for p in meta["pieces"])


# ------------------------------------------------------------------------------------------------
# The web UI in a real browser: the user's words in the transcript
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_stt():
    from moshi_mlx.model_files.assets import load_stt

    stt = load_stt(None)  # the demo's tiny random STT with its own 32-codebook Mimi
    yield stt
    stt.close()


@pytest.mark.asyncio
async def test_web_ui_shows_your_words(chromium, engine, mic_wav, demo_stt):
    """Headless Chromium with a fake microphone: our page asks for the user's words and shows "you:" turns."""
    from tests.helpers.browser import ARTIFACTS, Browser
    from tests.helpers.web_server import start_server, stop_server

    running = await start_server(engine, stt=demo_stt)
    browser = await Browser(chromium, mic_wav).start()
    try:
        await browser.goto(f"http://127.0.0.1:{running.port}/?rawmic=1&autoconnect=1")
        shown = await browser.wait_for("window.moshi && window.moshi.stats.userWords > 0", timeout=120)
        await browser.screenshot(ARTIFACTS / "browser_user_words.png")
        assert shown, browser.console[-10:]
        conv = running.server.active
        assert conv is not None and conv.query.user_words and conv.user_words > 0
        text = await browser.eval("document.getElementById('transcript').textContent")
        assert re.search(r"\[\s*\d+\.\d s\] you: \S+", text), text
        assert not [line for line in browser.console if "error" in line.lower()], browser.console[-10:]
    finally:
        await browser.close()
        await stop_server(running)
