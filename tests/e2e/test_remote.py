"""RemoteConversation (moshi_mlx.remote) against stand-in aiohttp servers that speak the protocol's corner
cases, and the URL / query parameter handling. Real sockets, real sphn Opus both ways; no sound devices.
"""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
import sphn
from aiohttp import WSMsgType, web

from moshi_mlx.audio.frames import FrameChunker
from moshi_mlx.net import protocol
from moshi_mlx.net.address import chat_url, sampling_params
from moshi_mlx.net.failures import (
    BadUrl,
    ConnectionLost,
    ProtocolFailure,
    ServerRefused,
    ServerUnreachable,
)
from moshi_mlx.net.protocol import Kind
from moshi_mlx.net.remote import RemoteConversation
from tests.helpers.ws_peer import start_peer

SR, FRAME = 24000, 1920


# ------------------------------------------------------------------------------------------------
# Stand-in servers
# ------------------------------------------------------------------------------------------------


class Echo:
    """Decodes the client's Opus, keeps the frames' RMS, sends each frame back re-encoded (+ a word every 5)."""

    def __init__(self) -> None:
        self.reader = sphn.OpusStreamReader(SR)
        self.writer = sphn.OpusStreamWriter(SR)
        self.chunker = FrameChunker()
        self.rms: list[float] = []
        self.query: dict[str, str] = {}

    async def serve(self, ws: web.WebSocketResponse, limit: int | None = None) -> None:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                continue
            m = protocol.decode(msg.data)
            if m is None or m.kind != Kind.AUDIO:
                continue
            for frame in self.chunker.push(self.reader.append_bytes(m.payload)):
                self.rms.append(float(np.sqrt(np.mean(frame**2))))
                await ws.send_bytes(protocol.encode_audio(self.writer.append_pcm(frame)))
                if len(self.rms) % 5 == 0:
                    await ws.send_bytes(protocol.encode_text(f" w{len(self.rms)}"))
                if limit is not None and len(self.rms) >= limit:
                    return




def tone(i: int, amp: float) -> np.ndarray:
    t = (np.arange(FRAME) + i * FRAME) / SR
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


class Collect:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.text: list[str] = []
        self.notices: list[str] = []
        self.info: list[dict] = []

    def conv(self, url: str, **kw) -> RemoteConversation:
        return RemoteConversation(
            url, on_audio=self.frames.append, on_text=self.text.append, on_notice=self.notices.append,
            on_info=self.info.append, **kw,
        )


async def until(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def stream(conv: RemoteConversation, n: int, amp: float = 0.3) -> None:
    for i in range(n):
        conv.push_mic(tone(i, amp))
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# Conversations
# ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_late_handshake_then_audio_both_ways_and_params_sent():
    echo = Echo()

    async def handler(request):
        echo.query = dict(request.query)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await asyncio.sleep(1.5)  # a server busy resetting its model
        await ws.send_bytes(protocol.encode_handshake(0, 1))
        await ws.send_bytes(protocol.encode_metadata({"type": "info", "server": "stand-in"}))
        await echo.serve(ws)
        return ws

    runner, url = await start_peer(handler)
    got = Collect()
    conv = got.conv(chat_url(url, sampling_params(text_temperature=0.5, audio_topk=100, seed=7)), handshake_timeout=5)
    try:
        hs = await conv.connect()
        assert (hs.protocol_version, hs.model_version) == (0, 1)
        run = asyncio.ensure_future(conv.run())
        await stream(conv, 20)
        await until(lambda: len(got.frames) >= 15)
        await conv.close()
        await asyncio.wait_for(run, 5)  # a close from our side ends run() quietly
    finally:
        await runner.cleanup()
    assert echo.query == {"text_temperature": "0.5", "audio_topk": "100", "seed": "7", "text_seed": "7",
                          "audio_seed": "7"}
    assert got.info == [{"type": "info", "server": "stand-in"}]
    assert all(f.shape == (FRAME,) and f.dtype == np.float32 for f in got.frames)
    # the echo is the tone we sent (Opus twice over): loud, not silence or noise
    assert np.median([np.sqrt(np.mean(f**2)) for f in got.frames[5:]]) > 0.1
    assert got.text[:2] == [" w5", " w10"] and conv.stats.text_pieces >= 2
    assert conv.stats.frames_dropped == 0 and len(conv.stats.latencies_ms) >= 10
    assert 0 < np.median(conv.stats.latencies_ms) < 2000


@pytest.mark.asyncio
async def test_no_handshake_is_a_protocol_error():
    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await asyncio.sleep(5)
        return ws

    runner, url = await start_peer(handler)
    try:
        with pytest.raises(ProtocolFailure, match=r"sent no handshake within 0.5 s"):
            await Collect().conv(url, handshake_timeout=0.5).connect()
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "first,error,match",
    [
        (protocol.encode_error("busy: another conversation is in progress"), ServerRefused,
         r"^127\.0\.0\.1:\d+ refused the conversation: busy: another conversation is in progress$"),
        (protocol.encode_text("hello"), ProtocolFailure, r"sent text before the handshake; is this a Moshi server\?"),
        (b"", ProtocolFailure, r"bad first message: empty message"),
        (b"\x00\x01\x02", ProtocolFailure, r"handshake payload must be empty or 8 bytes"),
        ("text frame", ProtocolFailure, r"sent a text WebSocket frame"),
        (None, ConnectionLost, r"closed the connection before the handshake"),
    ],
)
async def test_bad_starts(first, error, match):
    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if isinstance(first, str):
            await ws.send_str(first)
        elif first is not None:
            await ws.send_bytes(first)
        await ws.close()
        return ws

    runner, url = await start_peer(handler)
    try:
        with pytest.raises(error, match=match):
            await Collect().conv(url, handshake_timeout=5).connect()
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_error_mid_conversation_is_shown_and_conversation_goes_on():
    echo = Echo()

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(protocol.encode_handshake())
        await echo.serve(ws, limit=5)
        await ws.send_bytes(protocol.encode_error("could not decode audio; the Opus decoder was reset"))
        await ws.send_bytes(protocol.encode_audio(b"garbage, not Ogg"))  # the client's decoder must survive it
        await echo.serve(ws)
        return ws

    runner, url = await start_peer(handler)
    got = Collect()
    conv = got.conv(url)
    try:
        await conv.connect()
        run = asyncio.ensure_future(conv.run())
        await stream(conv, 25)
        await until(lambda: len(got.frames) >= 20)
        await conv.close()
        await asyncio.wait_for(run, 5)
    finally:
        await runner.cleanup()
    assert got.notices[0] == "server: could not decode audio; the Opus decoder was reset"
    assert any(n.startswith("could not decode the server's audio") for n in got.notices)
    assert conv.stats.server_errors == 1 and conv.stats.bad_audio == 1


@pytest.mark.asyncio
async def test_abrupt_close_mid_conversation_is_connection_lost():
    echo = Echo()

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(protocol.encode_handshake())
        await ws.send_bytes(protocol.encode_error("the model failed: out of memory"))
        await echo.serve(ws, limit=5)
        request.transport.abort()  # no close frame: the TCP connection just ends
        return ws

    runner, url = await start_peer(handler)
    got = Collect()
    conv = got.conv(url)
    try:
        await conv.connect()
        run = asyncio.ensure_future(conv.run())
        await stream(conv, 10)
        with pytest.raises(ConnectionLost) as info:
            await asyncio.wait_for(run, 10)
        await conv.close()
    finally:
        await runner.cleanup()
    assert str(info.value).startswith(f"connection to {conv.where} lost after ")
    assert "closed without a goodbye" in str(info.value) and "the server said: the model failed" in str(info.value)


@pytest.mark.asyncio
async def test_oldest_unsent_mic_frames_are_dropped():
    """The mic outruns the sender (frames pushed with no chance to send): only the newest max_unsent go out."""
    echo = Echo()

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(protocol.encode_handshake())
        await echo.serve(ws)
        return ws

    runner, url = await start_peer(handler)
    got = Collect()
    conv = got.conv(url, max_unsent=3)
    try:
        await conv.connect()
        run = asyncio.ensure_future(conv.run())
        for i in range(30):  # louder and louder, all before the event loop runs the sender
            conv.push_mic(tone(i, 0.01 * (i + 1)))
        assert conv.unsent_frames == 3
        await until(lambda: len(echo.rms) >= 3)
        await asyncio.sleep(0.3)
        await conv.close()
        await asyncio.wait_for(run, 5)
    finally:
        await runner.cleanup()
    assert conv.stats.frames_dropped == 27 and conv.stats.frames_sent == 3 and len(echo.rms) == 3
    # what reached the server is the last three frames (amplitude 0.28..0.30, RMS ~0.2), not the first ones
    assert min(echo.rms[1:]) > 0.15, echo.rms


# ------------------------------------------------------------------------------------------------
# Refusals before the WebSocket
# ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "status,match",
    [(403, r"refused the connection \(HTTP 403: origin or host not allowed\)"), (404, r"no Moshi chat endpoint at")],
)
async def test_http_refusals(status, match):
    async def handler(request):
        return web.Response(status=status, text="no\n")

    runner, url = await start_peer(handler)
    try:
        with pytest.raises(ServerRefused, match=match):
            await Collect().conv(url).connect()
    finally:
        await runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.asyncio
async def test_unreachable():
    port = _closed_port()
    with pytest.raises(ServerUnreachable, match=rf"^cannot reach 127\.0\.0\.1:{port}: connection refused "
                       r"\(is the server running\?\)$"):
        await Collect().conv(f"ws://127.0.0.1:{port}").connect()


@pytest.mark.asyncio
async def test_wss_to_a_plain_server_says_so():
    async def handler(request):
        return web.Response(text="plain http")

    runner, url = await start_peer(handler)
    try:
        with pytest.raises(ServerRefused, match=r"TLS handshake with 127\.0\.0\.1:\d+ failed .*plain ws:// server"):
            await Collect().conv(url.replace("ws://", "wss://")).connect()
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------------------------
# URLs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given,expected",
    [
        ("ws://localhost:8998", "ws://localhost:8998/api/chat"),
        ("localhost:8998", "ws://localhost:8998/api/chat"),
        ("https://192.168.1.20:8998/", "wss://192.168.1.20:8998/api/chat"),
        ("http://[::1]:8998", "ws://[::1]:8998/api/chat"),
        ("wss://moshi.example/custom/chat", "wss://moshi.example/custom/chat"),
    ],
)
def test_chat_url(given, expected):
    assert str(chat_url(given)) == expected


@pytest.mark.parametrize(
    "given,match",
    [("", "empty URL"), ("ftp://host:21", "the scheme must be"), ("ws://", "no host name"),
     ("ws://host:99999", "bad URL")],
)
def test_bad_urls(given, match):
    with pytest.raises(BadUrl, match=match):
        chat_url(given)


def test_params_only_those_given():
    assert sampling_params() == {}
    url = chat_url("ws://h:1", sampling_params(text_topk=25, audio_temperature=0.8))
    assert dict(url.query) == {"text_topk": "25", "audio_temperature": "0.8"}
    # and our server's parser takes them back as given
    parsed = protocol.parse_query(url.query)
    assert parsed.settings.text.top_k == 25 and parsed.settings.audio.temperature == 0.8 and not parsed.unknown
