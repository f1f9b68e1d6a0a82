"""The web server (moshi_mlx.server.app and .session) against a real aiohttp server and WebSocket clients.

The model is the demo one (tiny random LM, random Mimi), loaded once for the module. The CPU here is
slow and shared, so the model drops frames: the assertions are about the protocol and robustness,
never about timing.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import web

from moshi_mlx.net import protocol
from moshi_mlx.net.protocol import Kind
from moshi_mlx.settings import KNOBS, TextControls
from tests.helpers.web_server import (
    SR,
    Collector,
    abort,
    expect_handshake,
    make_speech,
    opus_messages,
    receive,
    start_server,
    stop_server,
    stream,
    until_closed,
    wait_idle,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    return make_speech(tmp_path_factory.mktemp("speech"))


@pytest_asyncio.fixture
async def srv(engine):
    running = await start_server(engine)
    yield running
    await stop_server(running)


@pytest_asyncio.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------


async def test_serves_ui_and_info(srv, session):
    async with session.get(srv.url("/")) as r:
        assert r.status == 200
        html = await r.text()
        assert "app.js" in html and "<html" in html
    for path in ("/app.js", "/audio-worklets.js", "/style.css", "/vendor/encoderWorker.min.js", "/vendor/ogg-opus-decoder.min.js"):
        async with session.get(srv.url(path)) as r:
            assert r.status == 200, path
    async with session.get(srv.url("/nope.js")) as r:
        assert r.status == 404
    async with session.get(srv.url("/../pyproject.toml")) as r:
        assert r.status in (400, 403, 404)
    async with session.get(srv.url("/api/info")) as r:
        info = await r.json()
    assert info["busy"] is False and info["demo"] is True
    assert "text_temperature" in info["defaults"]
    # the knob table, for the UI's form limits: the same bounds the query parser checks
    assert [(k["name"], k["low"], k["high"]) for k in info["knobs"]] == [
        (k.name, k.bounds.low, k.bounds.high) if k.bounds else (k.name, None, None) for k in KNOBS.values()]


async def test_cross_origin_websocket_refused(srv, session):
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(srv.url(), headers={"Origin": "http://evil.example"})
    assert info.value.status == 403
    async with session.ws_connect(srv.url(), headers={"Origin": f"http://127.0.0.1:{srv.port}"}) as ws:
        await expect_handshake(ws)


# ------------------------------------------------------------------------------------------------
# Conversations
# ------------------------------------------------------------------------------------------------


async def test_handshake_first_then_info(srv, session):
    query = (
        "text_temperature=0.5&text_topk=10&audio_topk=100&text_seed=42&audio_seed=7&pad_mult=-1.5"
        "&repetition_penalty=1.1&repetition_penalty_context=16&foo=bar"
    )
    async with session.ws_connect(srv.url(query=query)) as ws:
        await expect_handshake(ws)
        msg = protocol.decode((await receive(ws)).data)
        assert msg.kind == Kind.METADATA
        info = msg.json()
        assert info["type"] == "info" and info["sample_rate"] == 24000
        assert info["settings"] == {
            "text_temperature": 0.5, "text_topk": 10, "audio_temperature": 0.8, "audio_topk": 100, "seed": None,
            "text_seed": 42, "audio_seed": 7, "repetition_penalty": 1.1, "repetition_penalty_context": 16,
            "pad_mult": -1.5, "text_top_p": 1.0, "text_min_p": 0.0, "audio_top_p": 1.0, "audio_min_p": 0.0,
            "cfg_coef": 1.0, "condition": None,
        }
        assert info["ignored_params"] == {}
        assert info["unknown_params"] == ["foo"]
        s = srv.server.engine.settings
        assert (s.text.temperature, s.text.top_k, s.audio.top_k, s.seeds) == (0.5, 10, 100, (42, 7))
        # ... and the generator really runs with them.
        gen = srv.server.engine.gen
        assert (gen.text_seed, gen.audio_seed) == (42, 7)
        assert gen.text_controls == TextControls(repetition_penalty=1.1, repetition_penalty_context=16, pad_mult=-1.5)
        assert gen._recent.shape == (1, 16)


async def test_speech_in_audio_and_text_out(srv, session, speech):
    messages = opus_messages(speech[: 3 * SR], chunk=960)  # 20 ms... 40 ms pages, re-chunked by the server
    async with session.ws_connect(srv.url()) as ws:
        await expect_handshake(ws)
        col = Collector(ws)
        await stream(ws, messages)
        ok = await col.wait_for(lambda: col.audio_messages >= 5 and col.texts, timeout=20)
        conv = srv.server.active
        assert conv is not None and conv.frames_pushed >= 30  # 3 s = 37.5 frames; the last partial one waits
        assert conv.bad_audio == 0
        await ws.close()
        await col.stop()
    assert ok, f"got {col.audio_messages} audio messages and {len(col.texts)} text pieces"
    pcm = np.concatenate(col.pcm)
    assert col.samples == pcm.size and pcm.size >= 5 * 1920 and np.isfinite(pcm).all()
    assert "".join(col.texts).strip()
    assert col.errors == []
    stats = [m for m in col.metadata if m.get("type") == "stats"]
    assert stats and stats[-1]["frames_in"] > 0


async def test_malformed_messages_are_survived(srv, session, speech):
    good = opus_messages(speech[: 2 * SR], chunk=1920)
    rng = np.random.default_rng(0)
    async with session.ws_connect(srv.url()) as ws:
        await expect_handshake(ws)
        col = Collector(ws)
        await stream(ws, good[:5], 0.08)
        await ws.send_bytes(b"")  # empty
        await ws.send_bytes(b"\x09whatever")  # unknown kind: ignored
        await ws.send_bytes(b"\x03")  # control without its byte
        await ws.send_bytes(b"\x02\xff\xfe")  # text from the client: ignored
        await ws.send_bytes(b"\x06")  # ping: ignored
        await ws.send_str("hello")  # text frame
        await ws.send_bytes(b"\x01" + rng.bytes(3000))  # garbage Opus
        await ws.send_bytes(b"\x01" + b"OggS" + bytes(40))  # truncated page
        await ws.send_bytes(b"\x01" + bytes(300 * 1024))  # over the protocol limit, under aiohttp's
        await asyncio.sleep(0.3)
        await stream(ws, good[5:], 0.08)  # the same Ogg stream goes on
        ok = await col.wait_for(lambda: col.audio_messages >= 3, timeout=20)
        conv = srv.server.active
        assert conv is not None and not ws.closed
        assert conv.bad_audio >= 1 and conv.bad_messages >= 2
        assert conv.frames_pushed >= 15  # audio after the garbage was decoded again
        await ws.close()
        await col.stop()
    assert ok
    joined = " | ".join(col.errors)
    assert "empty message" in joined and "could not decode audio" in joined and "larger than the limit" in joined
    # A message beyond aiohttp's own limit closes that connection, not the server.
    async with session.ws_connect(srv.url()) as ws:
        await expect_handshake(ws)
        await ws.send_bytes(b"\x01" + bytes(2 * 1024 * 1024))
        await until_closed(ws)
    await wait_idle(srv.server)
    async with session.ws_connect(srv.url()) as ws:
        await expect_handshake(ws)


@pytest.mark.parametrize(
    "query,fragment",
    [
        ("text_temperature=hot", "text_temperature"),
        ("audio_topk=-5", "audio_topk"),
        ("text_seed=1.5", "text_seed"),
        ("audio_temperature=nan", "audio_temperature"),
        ("repetition_penalty=abc", "repetition_penalty"),
        ("repetition_penalty=0", "repetition_penalty"),
        ("repetition_penalty_context=-1", "repetition_penalty_context"),
        ("pad_mult=inf", "pad_mult"),
    ],
)
async def test_bad_query_params_get_error_then_close(srv, session, query, fragment):
    async with session.ws_connect(srv.url(query=query)) as ws:
        seen = await until_closed(ws)
    assert seen and seen[0].kind == Kind.ERROR, seen
    assert fragment in seen[0].text
    assert all(m.kind != Kind.HANDSHAKE for m in seen)
    assert srv.server.active is None


async def test_second_client_is_busy_then_served(srv, session, speech):
    async with session.ws_connect(srv.url()) as first:
        await expect_handshake(first)
        t0 = time.monotonic()
        async with session.ws_connect(srv.url()) as second:
            seen = await until_closed(second, timeout=5)
        assert time.monotonic() - t0 < 5
        assert [m.kind for m in seen] == [Kind.ERROR] and seen[0].text.startswith("busy")
        assert second.close_code == 1013
        # The first conversation is unaffected.
        col = Collector(first)
        await stream(first, opus_messages(speech[: SR], 1920), 0.08)
        assert await col.wait_for(lambda: col.audio_messages >= 1, timeout=20)
        await col.stop()
    # The first has left: the next client is served (even if it comes at once).
    async with session.ws_connect(srv.url()) as third:
        await expect_handshake(third)
    assert srv.server.refused_busy == 1


async def test_disconnect_mid_stream_then_new_client(srv, session, speech):
    messages = opus_messages(speech[: 2 * SR], 1920)
    ws = await session.ws_connect(srv.url())
    await expect_handshake(ws)
    await stream(ws, messages[:12], 0.08)
    # Vanish without a closing handshake.
    abort(ws)
    await wait_idle(srv.server)
    async with session.ws_connect(srv.url()) as ws2:
        await expect_handshake(ws2)
        col = Collector(ws2)
        await stream(ws2, messages, 0.08)
        assert await col.wait_for(lambda: col.audio_messages >= 2, timeout=20)
        await col.stop()


async def test_client_that_stops_reading_is_dropped(engine, session, speech):
    running = await start_server(engine, heartbeat=1.0)
    try:
        ws = await session.ws_connect(running.url(), autoping=False)
        await expect_handshake(ws)
        await stream(ws, opus_messages(speech[: SR], 1920), 0.08)
        # From now on this client neither reads nor answers pings.
        await wait_idle(running.server, timeout=15)
        async with session.ws_connect(running.url()) as ws2:
            await expect_handshake(ws2)
        abort(ws)
    finally:
        await stop_server(running)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return 0.0


async def test_many_connect_disconnect_cycles(srv, session, speech):
    page = opus_messages(speech[: 4 * 1920], 1920)

    async def cycle(i: int) -> None:
        async with session.ws_connect(srv.url(query=f"text_seed={i}")) as ws:
            await expect_handshake(ws)
            for m in page[: 1 + i % 3]:
                await ws.send_bytes(m)
            if i % 5 == 4:
                abort(ws)  # some vanish rudely

    for i in range(5):  # warm up allocations before measuring
        await cycle(i)
    await wait_idle(srv.server)
    threads0, rss0 = threading.active_count(), _rss_mb()
    t0 = time.monotonic()
    for i in range(5, 55):
        await cycle(i)
    await wait_idle(srv.server)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(0.2)
    threads1, rss1 = threading.active_count(), _rss_mb()
    assert threads1 <= threads0 + 1, f"threads grew from {threads0} to {threads1}"
    assert rss1 - rss0 < 100, f"RSS grew by {rss1 - rss0:.0f} MB over 50 cycles"
    assert srv.server.conversations == 55 and srv.server.refused_busy == 0
    async with session.get(srv.url("/api/info")) as r:
        info = await r.json()
    assert info["busy"] is False
    # Still serves a real conversation afterwards.
    async with session.ws_connect(srv.url()) as ws:
        await expect_handshake(ws)
        col = Collector(ws)
        await stream(ws, opus_messages(speech[:SR], 1920), 0.08)
        assert await col.wait_for(lambda: col.audio_messages >= 1, timeout=20)
        await col.stop()
    print(f"50 cycles in {elapsed:.1f} s; threads {threads0}->{threads1}; RSS {rss0:.0f}->{rss1:.0f} MB")


async def test_stalled_sender_keeps_memory_bounded(engine, session, speech, monkeypatch):
    """With the socket stuck, Moshi's audio is dropped rather than queued without end."""
    running = await start_server(engine, max_audio_backlog=4)
    stuck = asyncio.Event()
    real_send = web.WebSocketResponse.send_bytes

    async def send_bytes(self, data, *args, **kwargs):
        if stuck.is_set():
            await asyncio.sleep(3600)
        return await real_send(self, data, *args, **kwargs)

    monkeypatch.setattr(web.WebSocketResponse, "send_bytes", send_bytes)
    try:
        async with session.ws_connect(running.url()) as ws:
            await expect_handshake(ws)
            stuck.set()
            conv = running.server.active
            await stream(ws, opus_messages(speech[: 3 * SR], 1920), 0.08)
            deadline = time.monotonic() + 20
            while conv.dropped_out == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert conv.dropped_out > 0
            assert conv.out.audio_backlog <= 4 and len(conv.out) <= conv.out.max_total
    finally:
        await stop_server(running)


async def test_model_failure_is_reported_and_next_client_served(srv, session, speech, monkeypatch):
    engine = srv.server.engine
    real_step = engine.step
    calls = {"n": 0}

    def failing_step(codes):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure\nwith a backtrace line")
        return real_step(codes)

    monkeypatch.setattr(engine, "step", failing_step)
    async with session.ws_connect(srv.url()) as ws:
        await expect_handshake(ws)
        sender = asyncio.ensure_future(stream(ws, opus_messages(speech[: 2 * SR], 1920), 0.08))
        seen = await until_closed(ws, timeout=20)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    errors = [m.text for m in seen if m is not None and m.kind == Kind.ERROR]
    assert errors == ["the model failed: simulated failure"], errors
    assert ws.close_code == 1011
    monkeypatch.setattr(engine, "step", real_step)
    await wait_idle(srv.server)
    async with session.ws_connect(srv.url()) as ws:
        await expect_handshake(ws)
        col = Collector(ws)
        await stream(ws, opus_messages(speech[:SR], 1920), 0.08)
        assert await col.wait_for(lambda: col.audio_messages >= 1, timeout=20)
        await col.stop()


async def test_failing_reset_is_reported(srv, session, monkeypatch):
    engine = srv.server.engine

    def broken_reset(settings=None):
        raise RuntimeError("cannot reset")

    monkeypatch.setattr(engine, "reset", broken_reset)
    async with session.ws_connect(srv.url()) as ws:
        seen = await until_closed(ws)
    assert [m.kind for m in seen] == [Kind.ERROR] and "cannot reset" in seen[0].text
    monkeypatch.undo()
    await wait_idle(srv.server)
    async with session.ws_connect(srv.url()) as ws:
        await expect_handshake(ws)
