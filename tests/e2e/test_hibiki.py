"""Hibiki through every front end, from stand-in repos in a Hugging Face cache (offline, as after a download).

The repos are written in the layouts the published configs imply (tiny widths, Hibiki's codebooks, delays,
conditioner and file names; `stand_ins.tiny_hibiki_config`), with random weights: the model babbles, so the
tests check the path (hub names, -q at load time, Mimi's codebooks, conditioning and guidance flags, the
web server's info and query), never a translation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from moshi_mlx.model_files.stand_ins import (
    HIBIKI_REPOS,
    cache_stand_in_repo,
    demo_assets,
    tiny_hibiki_config,
    write_stand_in_repo,
)
from moshi_mlx.net import protocol
from moshi_mlx.net.protocol import Kind
from moshi_mlx.settings import EngineSettings
from tests.helpers.audio_env import ROOT, base_env
from tests.helpers.web_server import expect_handshake, receive, start_server, stop_server, until_closed

REPO_1B, REPO_2B = HIBIKI_REPOS["1b"], HIBIKI_REPOS["2b"]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds both Hibiki stand-in repos (config.json naming every file)."""
    root = tmp_path_factory.mktemp("hibiki")
    mimi = demo_assets(root / "demo").mimi_path  # one random Mimi, linked into both repos
    home = root / "hf_home"
    for size, repo in HIBIKI_REPOS.items():
        folder = write_stand_in_repo(root / size, tiny_hibiki_config(size), seed=1, mimi_source=mimi)
        cache_stand_in_repo(home / "hub", repo, folder)
    return home


def _env(hf_home: Path) -> dict:
    env = {k: v for k, v in base_env().items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def _tone_wav(path: Path, seconds: float = 1.2) -> Path:
    t = np.arange(int(seconds * 24000)) / 24000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(24000), w.writeframes(pcm.tobytes())
    return path


def _run(module: str, args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_run_inference_translates_a_file_quantized_at_load_with_guidance(hf_home, tmp_path):
    src, out, transcript = _tone_wav(tmp_path / "in.wav"), tmp_path / "out.wav", tmp_path / "t.json"
    r = _run("moshi_mlx.run_inference", [str(src), str(out), "--transcript", str(transcript), "--hf-repo", REPO_1B,
                                         "-q", "8", "--cfg-coef", "3", "--condition", "good", "--text-min-p", "0.01"],
             _env(hf_home))
    assert r.returncode == 0, r.stderr
    assert "hibiki-mlx-dc2cf5a5@80.safetensors, quantizing them to 8 bits" in r.stderr, r.stderr
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getnframes() == 15 * 1920  # 1.2 s in: 15 frames out
    assert json.loads(transcript.read_text())["frames"] == 15


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--hf-repo", REPO_1B, "--condition", "excellent"],
         "error: condition 'excellent' is not one of description's values: very_bad, bad, neutral, good, very_good"),
        (["--demo", "--cfg-coef", "3"],
         "error: cfg_coef 3: classifier-free guidance needs a model with conditioners"),
        (["--demo", "--condition", "very_good"],
         "error: condition 'very_good': this model has no conditioners"),
    ],
)
def test_what_the_model_cannot_take_is_refused_before_its_weights_load(hf_home, tmp_path, flags, message):
    r = _run("moshi_mlx.run_inference", [str(_tone_wav(tmp_path / "in.wav")), str(tmp_path / "out.wav"), *flags],
             _env(hf_home), timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == message, r.stderr
    assert "loading Moshi weights" not in r.stderr and "DEMO MODE" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.wav").exists()


def test_the_terminal_demo_refuses_guidance_before_loading(tmp_path):
    r = _run("moshi_mlx.local", ["--demo", "--cfg-coef", "2.5"], base_env(HOME=str(tmp_path)), timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: cfg_coef 2.5: classifier-free guidance needs a model with conditioners"), r.stderr
    assert "DEMO MODE" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flag,value", [("--cfg-coef", "-1"), ("--condition", "two words"), ("--text-top-p", "0")])
def test_bad_values_are_usage_errors_before_anything_loads(hf_home, tmp_path, flag, value):
    r = _run("moshi_mlx.local", ["--hf-repo", REPO_1B, flag, value], _env(hf_home), timeout=60)
    assert r.returncode == 2 and f"argument {flag}:" in r.stderr.strip().splitlines()[-1], r.stderr


# By hand (24 s here): the offline demo with sampling flags runs in CI in test_local.py; top-p / min-p reaching
# the sampler is checked by the unit tests.
@pytest.mark.long
def test_the_terminal_demo_takes_the_new_sampling_flags(tmp_path):
    """`local --demo` without a sound card runs offline; top-p and min-p reach its sampler."""
    out = tmp_path / "babble.wav"
    r = _run("moshi_mlx.local", ["--demo", "--demo-output", str(out), "--seed", "3", "--text-top-p", "0.5",
                                 "--audio-min-p", "0.2", "--cfg-coef", "1"], base_env(HOME=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "demo done:" in r.stderr and out.is_file()


def test_hibiki_2b_mimi_follows_the_model(hf_home, monkeypatch):
    """16 codebooks per stream: Mimi encodes and decodes 16, the engine runs a guided conversation on them."""
    from huggingface_hub import constants

    from moshi_mlx.model_files.assets import load
    from moshi_mlx.model_files.source import ModelSource

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assets = load(ModelSource(hf_repo=REPO_2B), log=lambda m: None)
    try:
        cfg = assets.lm.config
        assert (cfg.user_codebooks, cfg.generated_codebooks, assets.mimi.num_codebooks) == (16, 16, 16)
        assert cfg.model_type == "hibiki"
        engine = assets.engine(EngineSettings(cfg_coef=3.0, seed=1))
        results = [engine.process(np.zeros(1920, np.float32)) for _ in range(5)]
        engine.close()
        assert all(r.pcm.shape == (1920,) and np.isfinite(r.pcm).all() for r in results)
    finally:
        assets.mimi.close()


@pytest.fixture(scope="module")
def hibiki_engine(hf_home):
    """The 1B stand-in loaded from its files (the hub path is covered above), warmed."""
    from moshi_mlx.model_files.assets import load
    from moshi_mlx.model_files.source import ModelSource

    snapshot = next((hf_home / "hub" / f"models--{REPO_1B.replace('/', '--')}" / "snapshots").iterdir())
    names = json.loads((snapshot / "config.json").read_text())
    assets = load(ModelSource(moshi_weights=snapshot / names["moshi_name"], mimi_weights=snapshot / names["mimi_name"],
                              tokenizer=snapshot / names["tokenizer_name"], lm_config=snapshot / "config.json"),
                  log=lambda m: None)
    engine = assets.engine()
    engine.warmup()
    yield engine
    engine.close()


@pytest.mark.asyncio
async def test_web_server_says_translation_model_and_takes_guidance(hibiki_engine):
    srv = await start_server(hibiki_engine)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(srv.url("/api/info")) as r:
                info = await r.json()
            assert info["model_kind"] == "translation model"
            assert info["conditioning"] == {"conditioner": "description", "default": "very_good",
                                            "values": ["very_bad", "bad", "neutral", "good", "very_good"]}
            assert {"cfg_coef", "condition", "text_top_p", "audio_min_p"} <= set(info["protocol"]["params"])
            async with session.ws_connect(srv.url(query="cfg_coef=3&condition=good&audio_top_p=0.9")) as ws:
                await expect_handshake(ws)
                msg = protocol.decode((await receive(ws)).data)
                assert msg.kind == Kind.METADATA
                data = msg.json()
                assert data["model_kind"] == "translation model"
                assert (data["settings"]["cfg_coef"], data["settings"]["condition"]) == (3.0, "good")
                assert hibiki_engine.gen.rows == 2  # the conversation runs guided
            async with session.ws_connect(srv.url(query="condition=excellent")) as ws:
                seen = await until_closed(ws)
            assert seen[0].kind == Kind.ERROR and "not one of description's values" in seen[0].text
    finally:
        await stop_server(srv)


@pytest.mark.asyncio
async def test_web_server_of_an_unconditioned_model_refuses_guidance(engine):
    srv = await start_server(engine)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(srv.url("/api/info")) as r:
                info = await r.json()
            assert info["conditioning"] is None and info["model_kind"] == "conversation model"
            async with session.ws_connect(srv.url(query="cfg_coef=3")) as ws:
                seen = await until_closed(ws)
        assert seen[0].kind == Kind.ERROR
        assert seen[0].text == "bad parameter: cfg_coef 3: classifier-free guidance needs a model with conditioners"
    finally:
        await stop_server(srv)


@pytest.mark.asyncio
@pytest.mark.parametrize("conditioned", [True, False], ids=["hibiki", "moshi"])
async def test_the_page_offers_guidance_only_for_a_conditioned_model(chromium, mic_wav, hibiki_engine, engine,
                                                                     conditioned):
    """Hibiki: the form shows guidance and the model's conditions, and sends them; Moshi: neither is shown or sent."""
    from tests.helpers.browser import Browser

    srv = await start_server(hibiki_engine if conditioned else engine)
    browser = await Browser(chromium, mic_wav).start()
    try:
        await browser.goto(f"http://127.0.0.1:{srv.port}/")
        assert await browser.wait_for("document.getElementById('model').textContent.length > 0", timeout=20)
        assert await browser.wait_for("document.querySelector('#settings input[name=text_top_p]').max === '1'", 10)
        shown = await browser.eval("!document.getElementById('conditioning').hidden")
        kind = await browser.eval("document.getElementById('model').textContent")
        options = await browser.eval("Array.from(document.querySelector('select[name=condition]').options, o => o.value)")
        await browser.eval("document.querySelector('input[name=cfg_coef]').value = '3';"
                           "document.querySelector('input[name=text_min_p]').value = '0.05'")
        if conditioned:
            await browser.eval("document.querySelector('select[name=condition]').value = 'good'")
        query = await browser.eval("window.moshi.settingsQuery()")
        if conditioned:
            assert shown and kind.endswith("translation model"), kind
            assert options == ["", "very_bad", "bad", "neutral", "good", "very_good"]
            assert query == "text_min_p=0.05&cfg_coef=3&condition=good"
        else:
            assert not shown and kind.endswith("conversation model"), kind
            assert query == "text_min_p=0.05"  # a hidden field is never sent
        assert browser.errors == [], browser.errors
    finally:
        await browser.close()
        await stop_server(srv)


@pytest.mark.asyncio
async def test_local_web_serves_hibiki_quantized_with_guidance(hf_home):
    """`local_web --hf-repo kyutai/hibiki-1b-mlx-bf16 -q 4 --cfg-coef 3`: the server's defaults are the flags'."""
    import asyncio
    import re
    import signal
    import time

    env = {**_env(hf_home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi_mlx.local_web", "--hf-repo", REPO_1B, "-q", "4", "--cfg-coef", "3", "--no-browser",
         "--host", "127.0.0.1", "--port", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
    )
    lines: list[str] = []
    try:
        url, deadline = None, time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stderr.readline)
            if not line:
                break
            lines.append(line)
            if m := re.search(r"open (http://\S+/) in your browser", line):
                url = m.group(1)
        assert url, "".join(lines)
        assert any("quantizing them to 4 bits" in ln for ln in lines), "".join(lines)
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "api/info") as r:
                info = await r.json()
            assert info["model_kind"] == "translation model" and info["defaults"]["cfg_coef"] == 3.0
            async with s.ws_connect(url.replace("http", "ws") + "api/chat?condition=neutral") as ws:
                await expect_handshake(ws)
                msg = protocol.decode((await receive(ws)).data)
                assert msg.json()["settings"]["condition"] == "neutral" and msg.json()["settings"]["cfg_coef"] == 3.0
        proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.to_thread(proc.communicate, timeout=30))[1]
        assert proc.returncode == 0 and "Traceback" not in rest, "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_terminal_translates_the_microphone_live(hf_home, jack_tools, tmp_path):
    """`local --hf-repo kyutai/hibiki-1b-mlx-bf16 --cfg-coef 3` on virtual JACK devices: speech in at the real
    pace, the stand-in's babble out and on the speaker, a clean Ctrl-C. (CPU is scarce: frames drop.)"""
    from tests.helpers.apps import App, no_traceback, session_summary, talk
    from tests.helpers.audio_env import JackServer, read_wav, speech_wav

    speech = speech_wav(tmp_path / "speech.wav", rate=24000, pad=(0.5, 0.5))
    with JackServer(24000, 1920, log_dir=tmp_path) as jack:
        env = {**jack.env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
        app = App(["--hf-repo", REPO_1B, "--cfg-coef", "3", "--input-device", "system", "--output-device", "system"],
                  env)
        try:
            talk(jack, app, speech, tmp_path / "spk.wav", 5, 24000)
            app.interrupt()
        finally:
            app.kill()
    err = app.stderr
    assert app.proc.returncode in (0, 130), err
    no_traceback(err)
    assert f": {REPO_1B}" in err and "DEMO MODE" not in err, err
    summary = session_summary(err)
    assert summary["answered"] > 5, summary
    out, rate = read_wav(tmp_path / "spk.wav")
    assert rate == 24000 and np.isfinite(out).all() and np.abs(out).max() > 0
