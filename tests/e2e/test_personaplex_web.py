"""PersonaPlex through the real front ends: the web server (aiohttp, in-process) with a role prompt and a voice
from the query, as NVIDIA's client sends them; `/api/info`'s voices; bad values refused with one line while the
server keeps serving; the terminal client's flags in its query; the web UI's prompt box and voice picker in
headless Chromium.

The model is a stand-in in PersonaPlex's exact layout (PyTorch names, 16 depformer steps, loaded keeping 8) at
config_tiny()'s sizes, with random voice presets in `convert --voices`' layout, unpacked from its voices.tgz.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.model_files import personaplex
from moshi_mlx.model_files.assets import load
from moshi_mlx.model_files.hub import MIMI_NAME, TOKENIZER_NAME
from moshi_mlx.model_files.source import ModelSource
from moshi_mlx.model_files.stand_ins import STAND_IN_LM_CONFIG, demo_assets, write_personaplex_stand_in
from moshi_mlx.model_files.voice_archive import ready_voices
from moshi_mlx.net import protocol
from moshi_mlx.settings import EngineSettings
from tests.helpers.audio_env import ROOT, alsa_file_env
from tests.helpers.browser import ARTIFACTS, Browser
from tests.helpers.web_server import expect_handshake, opus_messages, start_server, stop_server, wait_idle
from tests.helpers.ws_peer import start_peer

CONTEXT = 200  # steps the test engine attends to: a prompt longer than that is refused
PROMPT = "You enjoy having a good conversation."
STATS = "window.moshi && window.moshi.stats"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    demo = demo_assets()
    return write_personaplex_stand_in(tmp_path_factory.mktemp("personaplex"), mimi_source=demo.mimi_path,
                                      tokenizer_source=demo.tokenizer_path)


@pytest.fixture(scope="module")
def persona_engine(stand_in, tmp_path_factory):
    assets = load(ModelSource(moshi_weights=stand_in / "model.safetensors", mimi_weights=stand_in / MIMI_NAME,
                              tokenizer=stand_in / TOKENIZER_NAME, lm_config=stand_in / STAND_IN_LM_CONFIG),
                  log=lambda line: None)
    assets.voices_dir = ready_voices(stand_in / personaplex.VOICES_ARCHIVE, lambda line: None,
                                     tmp_path_factory.mktemp("voice-cache"))
    (assets.voices_dir / "BROKEN.safetensors").write_bytes(b"this is no preset and no audio")
    engine = assets.engine(EngineSettings(context=CONTEXT))
    engine.warmup()
    yield engine
    engine.close()


def test_the_stand_in_loads_keeping_8_of_16_depformer_steps(stand_in, persona_engine):
    """The loaded depformer's step 7 is the checkpoint's step 7: its head and its row block of the stacked
    attention, read back from the file (which holds 16 steps)."""
    from mlx.utils import tree_flatten

    lm = persona_engine.lm
    assert lm.config.generated_codebooks == 8 and len(lm.depformer.slices) == 8
    ours = {k: np.asarray(v.astype(mx.float32)) for k, v in tree_flatten(lm.parameters())}
    file = mx.load(str(stand_in / "model.safetensors"))
    theirs = {k: np.asarray(file[k].astype(mx.float32)) for k in
              ("linears.7.weight", "linears.15.weight", "depformer.layers.1.self_attn.in_proj_weight")}
    assert theirs["linears.15.weight"].shape == theirs["linears.7.weight"].shape
    assert np.array_equal(ours["depformer.slices.7.linear_out.weight"], theirs["linears.7.weight"])
    stacked = theirs["depformer.layers.1.self_attn.in_proj_weight"]
    rows = stacked.shape[0] // personaplex.DEP_Q
    assert np.array_equal(ours["depformer.slices.7.transformer.layers.1.self_attn.in_proj.weight"],
                          stacked[7 * rows: 8 * rows])


@pytest.mark.parametrize("bits", [4, 8])
def test_the_stand_in_loads_quantized_after_keeping_its_steps(stand_in, bits):
    """-q 4/8 on PersonaPlex's float PyTorch checkpoint: mapped and trimmed to 8 steps first, quantized after."""
    from mlx import nn

    assets = load(ModelSource(quantize=bits, moshi_weights=stand_in / "model.safetensors",
                              mimi_weights=stand_in / MIMI_NAME, tokenizer=stand_in / TOKENIZER_NAME,
                              lm_config=stand_in / STAND_IN_LM_CONFIG), log=lambda line: None)
    slices = assets.lm.depformer.slices
    assert len(slices) == 8 and isinstance(slices[7].linear_out, nn.QuantizedLinear)
    assert slices[7].linear_out.bits == bits


async def _chat(running, query: dict[str, str]) -> tuple[list[protocol.Message], int | None]:
    """Open /api/chat with `query`; every message until the server closes (or audio flows), and the close code."""
    messages: list[protocol.Message] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(running.url(query=_qs(query))) as ws:
        try:
            while True:
                msg = await asyncio.wait_for(ws.receive(), 30)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                messages.append(protocol.decode(msg.data))
                if messages[-1] is not None and messages[-1].kind == protocol.Kind.HANDSHAKE:
                    for page in opus_messages(np.zeros(24000, np.float32)):
                        await ws.send_bytes(page)
                if any(m is not None and m.kind == protocol.Kind.AUDIO for m in messages):
                    break
        finally:
            code = ws.close_code
    return [m for m in messages if m is not None], code


def _qs(query: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode(query)


def _errors(messages: list[protocol.Message]) -> list[str]:
    return [m.text for m in messages if m.kind == protocol.Kind.ERROR]


@pytest.mark.asyncio
async def test_api_info_lists_voices_and_bad_values_get_one_line_then_a_good_client_talks(persona_engine):
    running = await start_server(persona_engine, default_settings=EngineSettings(context=CONTEXT))
    try:
        async with aiohttp.ClientSession() as http:
            info = await (await http.get(f"http://127.0.0.1:{running.port}/api/info")).json()
        persona = info["persona"]
        assert persona["voices"] == sorted([*personaplex.PRESETS, "BROKEN"]) and persona["voice"] is None
        bad = {
            "unknown voice": ({"voice_prompt": "NOBODY.pt"}, "unknown voice 'NOBODY'; this server has BROKEN, NATF0"),
            "a path": ({"voice_prompt": "../../etc/passwd"}, "is not a voice name"),
            "prompt longer than the context": ({"text_prompt": "talk " * 400}, f"the model attends to {CONTEXT}"),
            "a voice file that is not audio": ({"voice_prompt": "BROKEN"}, "BROKEN"),
        }
        for what, (query, needle) in bad.items():
            messages, code = await _chat(running, {"text_prompt": "", "voice_prompt": "", **query})
            errors = _errors(messages)
            assert len(errors) == 1 and needle in errors[0] and "\n" not in errors[0], (what, errors, code, [m.kind for m in messages])
            assert errors[0].startswith("bad parameter: ") and code == 1008, (what, errors, code)
            assert not [m for m in messages if m.kind == protocol.Kind.AUDIO], what
            await wait_idle(running.server)
        # Then a good one, as NVIDIA's client sends it: the prompt played, the conversation answers.
        messages, code = await _chat(running, {"text_prompt": PROMPT, "voice_prompt": "NATF2.pt", "text_seed": "1"})
        kinds = [m.kind for m in messages]
        assert kinds[0] == protocol.Kind.HANDSHAKE and protocol.Kind.AUDIO in kinds, _errors(messages)
        info_message = next(m.json() for m in messages if m.kind == protocol.Kind.METADATA)
        assert info_message["persona"] == {"text_prompt": PROMPT, "voice": "NATF2"}
        assert persona_engine.settings.voice == "NATF2" and persona_engine.settings.text_prompt == PROMPT
        assert running.server.conversations == 3  # the name checks refuse before admission; the model's, after
    finally:
        await stop_server(running)


@pytest.mark.asyncio
async def test_server_defaults_apply_when_a_client_sends_none(persona_engine):
    defaults = EngineSettings(context=CONTEXT, text_prompt=PROMPT, voice="VARM4")
    running = await start_server(persona_engine, default_settings=defaults)
    try:
        async with aiohttp.ClientSession() as http:
            info = await (await http.get(f"http://127.0.0.1:{running.port}/api/info")).json()
        assert info["persona"]["voice"] == "VARM4" and info["persona"]["text_prompt"] == PROMPT
        messages, _ = await _chat(running, {"text_prompt": "", "voice_prompt": ""})  # NVIDIA's client, nothing chosen
        assert protocol.Kind.AUDIO in [m.kind for m in messages], _errors(messages)
        assert persona_engine.settings.voice == "VARM4" and persona_engine.settings.text_prompt == PROMPT
    finally:
        await stop_server(running)


@pytest.mark.asyncio
async def test_a_model_without_persona_refuses_a_prompt(engine):
    running = await start_server(engine)
    try:
        async with aiohttp.ClientSession() as http:
            assert (await (await http.get(f"http://127.0.0.1:{running.port}/api/info")).json())["persona"] is None
        messages, code = await _chat(running, {"text_prompt": PROMPT})
        assert _errors(messages) == ["bad parameter: text_prompt: this model takes no role prompt or voice (a "
                                     "PersonaPlex model does)"] and code == 1008
        messages, _ = await _chat(running, {"text_prompt": "", "voice_prompt": ""})  # NVIDIA's empty values: fine
        assert protocol.Kind.AUDIO in [m.kind for m in messages]
    finally:
        await stop_server(running)


# ------------------------------------------------------------------------------------------------
# the terminal client


@pytest.fixture
def alsa_env(portaudio, tmp_path):
    np.zeros(1920 * 4, np.float32).tofile(tmp_path / "mic.f32")
    return alsa_file_env(tmp_path / "home", tmp_path / "mic.f32", tmp_path / "spk.raw")


DEVICES = ["--input-device", "fakemic_raw", "--output-device", "fakespk_raw", "--no-aec"]


async def _client(args: list[str], env: dict, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moshi_mlx.client", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, err.decode()


@pytest.mark.asyncio
async def test_client_sends_prompt_and_voice_in_the_query(alsa_env, tmp_path):
    seen = []

    async def refuse(request):  # a stand-in server: records the query, refuses as ours does
        seen.append(dict(request.query))
        from aiohttp import web

        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(protocol.encode_error("bad parameter: unknown voice 'VARF1'; this server has NATF0"))
        await ws.close(code=1008)
        return ws

    runner, url = await start_peer(refuse)
    prompt_file = tmp_path / "role.txt"
    prompt_file.write_text("You work for Moshi Pizza.\nBe brief.", encoding="utf-8")
    try:
        rc, err = await _client([url, "--text-prompt-file", str(prompt_file), "--voice", "VARF1", *DEVICES],
                                alsa_env)
    finally:
        await runner.cleanup()
    assert seen and seen[0]["text_prompt"] == "You work for Moshi Pizza.\nBe brief." and seen[0]["voice_prompt"] == "VARF1"
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("bad parameter: unknown voice 'VARF1'; this server has NATF0"), err


@pytest.mark.asyncio
async def test_client_refuses_a_voice_path_before_connecting(alsa_env, tmp_path):
    rc, err = await _client(["ws://127.0.0.1:9", "--voice", str(tmp_path / "me.wav"), *DEVICES], alsa_env)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: --voice "), err
    assert "a server's voice is one of its presets, by name" in err and "a recording stays on this machine" in err


# ------------------------------------------------------------------------------------------------
# the web UI


@pytest.mark.asyncio
async def test_browser_types_a_prompt_picks_a_voice_and_the_conversation_starts(chromium, persona_engine, mic_wav):
    running = await start_server(persona_engine)
    browser = await Browser(chromium, mic_wav).start()
    try:
        await browser.goto(f"http://127.0.0.1:{running.port}/?rawmic=1")
        assert await browser.wait_for(
            "!document.getElementById('persona').hidden && "
            "document.querySelector('[name=voice_prompt]').options.length > 5", timeout=30), browser.console[-10:]
        # Type the role prompt as a person does (key events into the box), pick a voice.
        await browser.eval("document.querySelector('[name=text_prompt]').focus()")
        await browser.call("Input.insertText", text=PROMPT)
        await browser.eval(
            "(() => { const s = document.querySelector('[name=voice_prompt]'); s.value = 'NATM1';"
            " s.dispatchEvent(new Event('input', {bubbles: true})); })()"
        )
        query = await browser.eval("window.moshi.settingsQuery()")
        assert "voice_prompt=NATM1" in query and "text_prompt=You+enjoy" in query, query
        # A role longer than the model's context first: refused in one line, shown, and the page can go on.
        await browser.eval("document.querySelector('[name=text_prompt]').value = 'talk '.repeat(400)")
        await browser.eval("document.getElementById('connect').click()")
        assert await browser.wait_for(
            "document.getElementById('message').textContent.includes('bad parameter')", timeout=60), browser.console[-10:]
        shown = await browser.eval("document.getElementById('message').textContent")
        assert shown.startswith("The server refused: bad parameter: the system prompt takes"), shown
        await wait_idle(running.server)
        await browser.eval(f"document.querySelector('[name=text_prompt]').value = {json.dumps(PROMPT)}")
        await browser.eval("document.getElementById('connect').click()")
        assert await browser.wait_for(f"{STATS}.handshake === true", timeout=60), browser.console[-10:]
        assert await browser.wait_for(f"{STATS}.audioMessagesIn > 5", timeout=60), browser.console[-10:]
        stats = json.loads(await browser.eval(f"JSON.stringify({STATS})"))
        assert stats["serverInfo"]["persona"] == {"text_prompt": PROMPT, "voice": "NATM1"}
        assert persona_engine.settings.voice == "NATM1"
        await browser.screenshot(ARTIFACTS / "browser_persona.png")
        await browser.eval("document.getElementById('connect').click()")
        await wait_idle(running.server)
    finally:
        await browser.close()
        await stop_server(running)


@pytest.mark.asyncio
async def test_browser_hides_the_persona_card_for_another_model(chromium, engine, mic_wav):
    running = await start_server(engine)
    browser = await Browser(chromium, mic_wav).start()
    try:
        await browser.goto(f"http://127.0.0.1:{running.port}/")
        assert await browser.wait_for("document.getElementById('connect').disabled === false", timeout=30)
        assert await browser.eval("document.getElementById('persona').hidden") is True
        assert "text_prompt" not in await browser.eval("window.moshi.settingsQuery()")
    finally:
        await browser.close()
        await stop_server(running)


# ------------------------------------------------------------------------------------------------
# `python -m moshi_mlx.local_web --text-prompt ... --voice ...`: the defaults of every connection


def _local_web_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.setdefault("MOSHI_MLX_DEMO_DIR", str(Path("~/.cache/moshi_mlx/demo").expanduser()))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _model_flags(stand_in: Path, voices: Path) -> list[str]:
    return ["--moshi-weights", str(stand_in / "model.safetensors"), "--mimi-weights", str(stand_in / MIMI_NAME),
            "--tokenizer", str(stand_in / TOKENIZER_NAME), "--lm-config", str(stand_in / STAND_IN_LM_CONFIG),
            "--voices-dir", str(voices), "--no-browser", "--host", "127.0.0.1", "--port", "0"]


def test_local_web_refuses_an_unknown_default_voice_before_loading(stand_in, tmp_path):
    import subprocess

    voices = ready_voices(stand_in / personaplex.VOICES_ARCHIVE, lambda line: None, tmp_path / "cache")
    r = subprocess.run([sys.executable, "-m", "moshi_mlx.local_web", *_model_flags(stand_in, voices),
                        "--voice", "NOBODY"], capture_output=True, text=True, env=_local_web_env(), timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unknown voice 'NOBODY'" in r.stderr, r.stderr
    assert "loading" not in r.stderr


@pytest.mark.asyncio
async def test_local_web_prompt_and_voice_are_the_defaults_of_every_connection(stand_in, tmp_path):
    import re
    import signal
    import subprocess
    import time

    voices = ready_voices(stand_in / personaplex.VOICES_ARCHIVE, lambda line: None, tmp_path / "cache")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi_mlx.local_web", *_model_flags(stand_in, voices), "--text-prompt", PROMPT,
         "--voice", "NATF1"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_local_web_env(),
    )
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stderr.readline)
            if not line:
                break
            lines.append(line)
            m = re.search(r"open (http://\S+/) in your browser", line)
            if m:
                url = m.group(1)
        assert url, "".join(lines)
        async with aiohttp.ClientSession() as http:
            info = await (await http.get(url + "api/info")).json()
            assert info["persona"]["voice"] == "NATF1" and info["persona"]["text_prompt"] == PROMPT
            assert "NATF1" in info["persona"]["voices"]
            # NVIDIA's client with nothing chosen: the server's prompt and voice
            ws_url = url.replace("http", "ws") + "api/chat?text_prompt=&voice_prompt="
            async with http.ws_connect(ws_url) as ws:
                await expect_handshake(ws, timeout=60)
                meta = protocol.decode((await asyncio.wait_for(ws.receive(), 30)).data)
                assert meta.json()["persona"] == {"text_prompt": PROMPT, "voice": "NATF1"}
        proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.to_thread(proc.communicate, timeout=30))[1]
        assert proc.returncode == 0 and "Traceback" not in rest, "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
