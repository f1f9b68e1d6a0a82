"""The web page keeps its recording in IndexedDB as it goes: headless Chromium records a conversation, is killed
with SIGKILL mid-conversation (a crash, a dead battery), is started again on the same profile, and the page
offers the unsaved conversation; the files downloaded then are what the page had recorded, all but the last
half second, sample for sample (compared with the page's own WAV read just before the kill)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import wave

import numpy as np
import pytest

from tests.helpers.browser import Browser
from tests.helpers.web_server import start_server, stop_server, wait_idle

pytestmark = pytest.mark.asyncio

STATS = "window.moshi && window.moshi.stats"
#: The page writes to IndexedDB every 0.5 s; a kill loses at most that, plus the flush in flight.
MAX_LOST_S = 1.0
#: Moshi's voice may trail the microphone by this much in the last flush (its lag, larger on a loaded machine).
MOSHI_LAG_S = 3.0
#: At most this passes between reading what the page holds and the kill (a flush can land in between).
SNAPSHOT_TO_KILL_S = 0.6


def _pcm(wav_bytes: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(wav_bytes)) as w:
        ch, rate = w.getnchannels(), w.getframerate()
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, ch), rate


async def _wait_file(folder, suffix: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.glob(f"*{suffix}") if not p.name.endswith(".crdownload")]
        if done and done[0].stat().st_size > 0:
            await asyncio.sleep(0.3)
            return done[0]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {suffix} in {sorted(p.name for p in folder.iterdir())}")


async def test_a_killed_browser_offers_the_conversation_again(chromium, engine, mic_wav, tmp_path):
    running = await start_server(engine)
    page = f"http://127.0.0.1:{running.port}/"
    browser = await Browser(chromium, mic_wav).start()
    try:
        await browser.goto(page + "?rawmic=1&autoconnect=1")
        assert await browser.wait_for(f"{STATS}.handshake === true", timeout=60), browser.console[-10:]
        assert await browser.wait_for(
            "window.moshi.recording.seconds > 4 && window.moshi.recording.moshi.length > 0 && "
            f"{STATS}.transcriptChars > 0", timeout=60,
        ), browser.console[-10:]
        # What the page holds at the moment of the kill: its stereo WAV, its words.
        before = json.loads(await browser.eval(
            "(async () => { const r = window.moshi.recording;"
            " const b = new Uint8Array(await r.stereoWav().arrayBuffer()); let s = '';"
            " for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode(...b.subarray(i, i + 8192));"
            " return JSON.stringify({wav: btoa(s), pieces: r.pieces, seconds: r.seconds}); })()"
        ))
        profile = await browser.crash()
    except BaseException:
        await browser.close()
        await stop_server(running)
        raise
    await wait_idle(running.server)  # the server saw the connection drop

    browser = Browser(chromium, mic_wav, profile=profile)
    try:
        await browser.start()
        await browser.goto(page)  # no autoconnect: the page only offers what it kept
        assert await browser.wait_for("!document.getElementById('save').hidden", timeout=30), browser.console[-10:]
        note = await browser.eval("document.getElementById('save-note').textContent")
        assert note.startswith("Not saved last time: "), note
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        await browser.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
        for kind in ("stereo", "json"):
            await browser.eval(f"document.querySelector('#save button[data-save={kind}]').click()")
        stereo_path = await _wait_file(downloads, "-stereo.wav")
        meta = json.loads((await _wait_file(downloads, "-transcript.json")).read_text())

        had, rate = _pcm(base64.b64decode(before["wav"]))
        got, got_rate = _pcm(stereo_path.read_bytes())
        lost_s = (len(had) - len(got)) / rate
        print(f"\nbrowser killed with {len(had) / rate:.2f} s recorded in the page; {len(got) / rate:.2f} s offered "
              f"after the restart ({lost_s:.2f} s lost)")
        # The kill comes a moment after the snapshot: a flush may land in between (then "lost" is negative).
        assert got_rate == rate and -SNAPSHOT_TO_KILL_S <= lost_s <= MAX_LOST_S, (len(had), len(got), rate)
        n = min(len(had), len(got))
        assert np.array_equal(got[:n, 0], had[:n, 0])  # your voice: sample for sample what the page had
        # Moshi's voice arrives later than the microphone's (network and model lag), so the last flush may hold a
        # shorter right channel, zero-padded: equal up to where it had arrived, silent after, and not far behind.
        heard = np.flatnonzero(got[:n, 1])
        arrived = int(heard[-1]) + 1 if heard.size else 0
        assert np.array_equal(got[:arrived, 1], had[:arrived, 1]) and not got[arrived:n, 1].any()
        assert n - arrived <= MOSHI_LAG_S * rate, (n - arrived) / rate
        texts, said = [p["text"] for p in meta["pieces"]], [p["text"] for p in before["pieces"]]
        assert texts[: len(said)] == said[: len(texts)] and meta["seconds"] == round(len(got) / rate, 3)

        # Saved: a reload no longer offers it.
        await browser.goto(page)
        await asyncio.sleep(1.5)
        assert await browser.wait_for("document.readyState === 'complete'", timeout=10)
        assert await browser.eval("document.getElementById('save').hidden") is True
        assert browser.errors == [], browser.errors
    finally:
        await browser.close()
        await stop_server(running)
