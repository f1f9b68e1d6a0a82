"""The web UI in a real browser: headless Chromium with a fake microphone fed from spoken WAV.

The page is served by the real server (demo model, in-process) and driven over the Chrome DevTools
Protocol with aiohttp (no Playwright or Selenium needed). The test checks that the page streamed the
microphone (the server decoded its Ogg/Opus), that Moshi's audio came back and was decoded and played
by the page, that the transcript filled, and that a busy server and a disconnect are shown properly.
Screenshots go to artifacts/.

Needs Debian's ``chromium`` (apt-get install chromium); skipped with a reason when it is missing.
Set MOSHI_MLX_CHROMIUM to use another Chromium/Chrome binary.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from moshi_mlx.settings import KNOBS
from tests.helpers.browser import ARTIFACTS, Browser
from tests.helpers.web_server import (
    expect_handshake,
    start_server,
    stop_server,
    wait_idle,
)

pytestmark = pytest.mark.asyncio





# ------------------------------------------------------------------------------------------------
# A minimal DevTools Protocol client
# ------------------------------------------------------------------------------------------------




# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------








STATS = "window.moshi && window.moshi.stats"


def _wav(path: Path) -> tuple[np.ndarray, int]:
    import wave

    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2
        ch, rate = w.getnchannels(), w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32767
    return x.reshape(-1, ch), rate


async def _downloads_to(browser: Browser, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        await browser.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(folder))
    except RuntimeError:  # older Chromium: the page-level (deprecated) form
        await browser.call("Page.setDownloadBehavior", behavior="allow", downloadPath=str(folder))


async def _wait_file(folder: Path, suffix: str, timeout: float = 20) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.glob(f"*{suffix}") if not p.name.endswith(".crdownload")]
        if done and done[0].stat().st_size > 0:
            await asyncio.sleep(0.3)  # let Chromium finish the rename
            return done[0]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {suffix} downloaded into {folder}: {sorted(p.name for p in folder.iterdir())}")


async def test_browser_talks_to_moshi(chromium, engine, mic_wav, tmp_path):
    running = await start_server(engine)
    browser = await Browser(chromium, mic_wav).start()
    page = f"http://127.0.0.1:{running.port}/"
    try:
        # 1. Busy server: a Python client holds the conversation; Connect is disabled and says why.
        async with aiohttp.ClientSession() as http, http.ws_connect(running.url()) as holder:
            await expect_handshake(holder)
            await browser.goto(page + "?rawmic=1&autoconnect=1")
            busy_shown = await browser.wait_for(
                "document.getElementById('server-note').textContent.includes('busy')", timeout=30
            )
            await browser.screenshot(ARTIFACTS / "browser_busy.png")
            assert busy_shown, f"no busy note; console: {browser.console[-10:]}"
            assert await browser.eval("document.getElementById('connect').disabled") is True
            assert "busy" in await browser.eval("document.getElementById('connect').title")
            assert running.server.conversations == 1  # autoconnect did not even try
        await wait_idle(running.server)
        # The page notices by itself that the server is free again.
        assert await browser.wait_for("!document.getElementById('connect').disabled", timeout=10)
        assert await browser.eval("document.getElementById('server-note').hidden") is True

        # The form's limits are the server's knob table (/api/info), not the page's own.
        limits = await browser.eval(
            "(() => { const e = document.getElementById('settings').elements;"
            " return [e.text_topk.min, e.text_topk.max, e.text_topk.step, e.pad_mult.min, e.pad_mult.step]; })()"
        )
        topk, pad = KNOBS["text_topk"].bounds, KNOBS["pad_mult"].bounds
        assert limits == [str(topk.low), str(topk.high), "1", f"{pad.low:g}", "any"]

        # 2. Choose settings (Kyutai's parameter names), connect by clicking, stream the fake microphone,
        #    hear Moshi, read its words.
        await browser.eval(
            "(() => { const f = document.getElementById('settings'); const e = f.elements;"
            " e.text_topk.value = '10'; e.text_seed.value = '7'; e.audio_seed.value = '7';"
            " e.repetition_penalty.value = '1.1'; e.repetition_penalty_context.value = '32'; e.pad_mult.value = '0.5';"
            " f.dispatchEvent(new Event('input')); })()"
        )
        await browser.eval("document.getElementById('connect').click()")
        assert await browser.wait_for(f"{STATS}.handshake === true", timeout=30), browser.console[-10:]
        conv = running.server.active
        assert conv is not None
        ok = await browser.wait_for(
            f"{STATS}.samplesDecoded > 48000 && {STATS}.samplesPlayed > 24000 && {STATS}.transcriptChars > 0",
            timeout=60,
        )
        stats = json.loads(await browser.eval(f"JSON.stringify({STATS})"))
        await browser.screenshot(ARTIFACTS / "browser_conversation.png")
        (ARTIFACTS / "browser_stats.json").write_text(json.dumps(stats, indent=1))
        assert ok, f"page stats: {stats}; console: {browser.console[-10:]}"
        # The page's microphone reached the model as decodable Ogg/Opus.
        assert stats["pagesSent"] > 10 and stats["maxInputRms"] > 0.01
        assert conv.frames_pushed > 10 and conv.bad_audio == 0
        # Moshi's audio came back, was decoded and went through the jitter buffer.
        assert stats["audioMessagesIn"] > 5 and stats["decodeErrors"] == 0
        assert stats["serverInfo"]["type"] == "info" and stats["serverStats"] is not None
        settings = stats["serverInfo"]["settings"]
        assert settings["text_topk"] == 10 and settings["text_seed"] == 7 and settings["audio_seed"] == 7
        # Every setting went out under the name Kyutai's client uses, and the server read it.
        sent = set(conv.query.applied) | set(conv.query.ignored)
        assert {"text_topk", "text_seed", "audio_seed", "repetition_penalty", "repetition_penalty_context",
                "pad_mult"} <= sent, (conv.query.applied, conv.query.ignored)
        assert await browser.eval("document.querySelector('#settings input[name=text_seed]').disabled") is True
        assert await browser.eval("document.getElementById('demo-note').hidden") is False
        assert stats["errors"] == []  # fresh state: the busy episode is forgotten
        # The meters are exposed to assistive technology with live values.
        assert await browser.wait_for("+document.getElementById('meter-in-box').getAttribute('aria-valuenow') > 0", 5)
        assert await browser.eval("document.getElementById('meter-out-box').getAttribute('role')") == "meter"
        # The conversation can be saved while it runs.
        assert await browser.eval("!document.getElementById('save').hidden") is True
        assert "so far" in await browser.eval("document.getElementById('save-note').textContent")

        # 3. Disconnect: the server ends the conversation, the page is ready again with no stale state.
        await browser.eval("document.getElementById('connect').click()")
        await wait_idle(running.server)
        assert await browser.wait_for(f"{STATS}.state === 'idle'", timeout=10)
        assert await browser.eval("document.getElementById('connect').textContent") == "Connect"
        assert await browser.eval("document.getElementById('lag').textContent") == ""
        assert await browser.wait_for(
            "document.getElementById('meter-in-box').getAttribute('aria-valuenow') === '0' && "
            "document.getElementById('meter-out-box').getAttribute('aria-valuenow') === '0'", timeout=5
        )

        # 4. Save everything and check it against what the server heard and the page showed.
        shown = (await browser.eval("document.querySelector('#transcript p:last-child').lastChild.data")).strip()
        downloads = tmp_path / "downloads"
        await _downloads_to(browser, downloads)
        for kind in ("stereo", "mixed", "txt", "json"):
            await browser.eval(f"document.querySelector('#save button[data-save={kind}]').click()")
        stereo_path = await _wait_file(downloads, "-stereo.wav")
        mixed_path = await _wait_file(downloads, "-mixed.wav")
        txt_path = await _wait_file(downloads, "-transcript.txt")
        json_path = await _wait_file(downloads, "-transcript.json")
        await browser.screenshot(ARTIFACTS / "browser_saved.png")
        stereo, rate = _wav(stereo_path)
        mixed, mixed_rate = _wav(mixed_path)
        assert stereo.shape[1] == 2 and mixed.shape[1] == 1 and rate == mixed_rate and len(mixed) == len(stereo)
        you, moshi = stereo[:, 0], stereo[:, 1]
        assert np.sqrt(np.mean(you**2)) > 0.01 and np.sqrt(np.mean(moshi**2)) > 1e-4
        assert not np.allclose(you, moshi)
        # Length: the microphone audio the server decoded covers the same span, within one 80 ms frame.
        heard_s = (conv.frames_pushed * 1920 + conv.opus.pending) / 24000
        recorded_s = len(stereo) / rate
        print(f"\nrecording {recorded_s:.3f} s at {rate} Hz; server decoded {heard_s:.3f} s of microphone")
        assert abs(recorded_s - heard_s) <= 0.08, (recorded_s, heard_s)
        assert txt_path.read_text(encoding="utf-8").strip() == shown and shown
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        assert meta["text"] == shown and meta["sample_rate"] == rate
        assert "".join(p["text"] for p in meta["pieces"]).strip() == shown
        times = [p["t"] for p in meta["pieces"]]
        assert times == sorted(times) and times[-1] <= recorded_s

        # 5. Clear can be undone.
        await browser.eval("document.getElementById('clear').click()")
        assert await browser.eval("document.getElementById('transcript').textContent") == ""
        assert await browser.eval("document.getElementById('undo').hidden") is False
        await browser.eval("document.getElementById('undo').click()")
        assert (await browser.eval("document.querySelector('#transcript p:last-child').lastChild.data")).strip() == shown

        # 6. Lost connection: the server goes away mid-conversation; the page says so.
        await browser.eval("document.getElementById('connect').click()")
        assert await browser.wait_for(f"{STATS}.handshake === true", timeout=30)
        assert await browser.eval("document.getElementById('save').hidden") is False  # a new recording
        await running.runner.cleanup()
        lost = await browser.wait_for(
            "document.getElementById('message').textContent.length > 0 && " f"{STATS}.state === 'error'", timeout=15
        )
        await browser.screenshot(ARTIFACTS / "browser_lost.png")
        assert lost, browser.console[-10:]
        # 7. Server down: Connect says so plainly (not "Failed to load worklet module script").
        await browser.eval("document.getElementById('connect').click()")
        down = await browser.wait_for(
            "document.getElementById('message').textContent.includes('does not answer')", timeout=15
        )
        message = await browser.eval("document.getElementById('message').textContent")
        await browser.screenshot(ARTIFACTS / "browser_server_down.png")
        assert down and "worklet" not in message.lower(), message
    finally:
        await browser.close()
        await stop_server(running)


async def test_narrow_screen_favicon_and_no_errors(chromium, engine, mic_wav):
    """At 390 px the header keeps the whole model name; the favicon loads; nothing is logged as an error."""
    running = await start_server(engine)
    browser = await Browser(chromium, mic_wav).start()
    try:
        await browser.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
        await browser.goto(f"http://127.0.0.1:{running.port}/")
        assert await browser.wait_for("document.getElementById('model').textContent.length > 0", timeout=20)
        layout = await browser.eval(
            "(() => { const m = document.getElementById('model'), h = document.querySelector('h1');"
            " const mr = m.getBoundingClientRect(), hr = h.getBoundingClientRect();"
            " return {pageWidth: document.documentElement.scrollWidth, modelCut: m.scrollWidth > m.clientWidth,"
            " modelRight: mr.right, overlap: !(mr.top >= hr.bottom || mr.left >= hr.right)}; })()"
        )
        await browser.screenshot(ARTIFACTS / "browser_390px.png")
        assert layout["pageWidth"] <= 390 and not layout["modelCut"] and layout["modelRight"] <= 390, layout
        assert not layout["overlap"], layout
        # Nothing to save before a conversation: the save buttons are not even shown.
        assert await browser.eval("document.getElementById('save').getClientRects().length") == 0
        icon = await browser.eval("fetch('favicon.ico').then(r => r.status + ' ' + r.headers.get('content-type'))")
        assert icon.startswith("200"), icon
        await browser.eval("document.querySelector('details.settings').open = true")
        await browser.screenshot(ARTIFACTS / "browser_390px_settings.png")
        for name in ("repetition_penalty", "repetition_penalty_context", "pad_mult", "text_seed", "audio_seed"):
            assert await browser.eval(f"!!document.querySelector('#settings input[name={name}]')"), name
        assert browser.errors == [], browser.errors
    finally:
        await browser.close()
        await stop_server(running)


async def test_denied_microphone_is_explained(chromium, engine, mic_wav):
    running = await start_server(engine)
    browser = await Browser(chromium, mic_wav, allow_mic=False).start()
    try:
        origin = f"http://127.0.0.1:{running.port}"
        try:  # without --use-fake-ui-for-media-stream headless Chromium denies anyway; make it explicit
            await browser.call(
                "Browser.setPermission", origin=origin, permission={"name": "microphone"}, setting="denied"
            )
        except RuntimeError:
            pass
        await browser.goto(origin + "/?autoconnect=1")
        shown = await browser.wait_for(
            "document.getElementById('message').textContent.includes('denied')", timeout=30
        )
        await browser.screenshot(ARTIFACTS / "browser_mic_denied.png")
        message = await browser.eval("document.getElementById('message').textContent")
        assert shown, f"message {message!r}; console: {browser.console[-5:]}"
        assert running.server.conversations == 0  # no connection without a microphone
    finally:
        await browser.close()
        await stop_server(running)


async def test_silent_microphone_is_explained(chromium, engine, tmp_path):
    """A microphone track of exact zeros (what a system-blocked microphone gives, with no error): after 3 s the
    page says so and names the system settings, while the conversation goes on."""
    from tests.helpers.web_server import write_wav

    zeros = write_wav(tmp_path / "zeros48k.wav", np.zeros(48000 * 2, np.float32), 48000)
    running = await start_server(engine)
    browser = await Browser(chromium, zeros).start()
    try:
        await browser.goto(f"http://127.0.0.1:{running.port}/?autoconnect=1")
        shown = await browser.wait_for(f"{STATS}.micSilent", timeout=60)
        message = await browser.eval("document.getElementById('message').textContent")
        assert shown, f"stats {await browser.eval(f'JSON.stringify({STATS})')}; console: {browser.console[-5:]}"
        assert message.startswith("Your microphone gives only silence (exact zeros for 3 s)"), message
        assert "System Settings → Privacy & Security → Microphone" in message
        assert await browser.eval(f"{STATS}.state") == "live"  # a warning, not a failure
    finally:
        await browser.close()
        await stop_server(running)
