"""The client side of Kyutai's WebSocket protocol: one conversation with a remote Moshi server.

:class:`RemoteConversation` connects to ``/api/chat`` (ours, Kyutai's PyTorch or Rust server), waits
for the handshake, then streams 80 ms microphone frames out as Ogg/Opus (sphn) and hands Moshi's
audio (re-chunked into 80 ms frames) and words back through callbacks. It knows nothing about sound
devices or terminals: :mod:`moshi_mlx.client` wires it to them, the benchmark to a clock.

Latency stays bounded on the way out: microphone frames wait in a small queue (``max_unsent``) and
the oldest are dropped, counted, when the connection cannot take them (the socket's send buffer is
backed up). Playback's bound is the caller's (``DuplexAudio``'s play buffer drops late frames).

Every failure is one of the :class:`ClientError` classes, each with a one-line message for the user
(worded in :mod:`moshi_mlx.net.failures`); the URL comes from :mod:`moshi_mlx.net.address` and the
codec is :class:`~moshi_mlx.net.opus.OpusFrames`.
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
import numpy as np
from yarl import URL

from ..audio.frames import FRAME_S
from ..errors import first_line
from . import protocol
from .address import chat_url
from .failures import (
    ConnectionLost,
    ProtocolFailure,
    ServerRefused,
    close_reason,
    connect_failure,
    message_text,
)
from .opus import OpusDecodeError, OpusFrames
from .protocol import Kind, ProtocolError

__all__ = ["RemoteConversation", "RemoteStats"]

#: Bytes allowed to wait in the connection's send buffer before mic frames are held back (~6 frames).
SEND_BACKLOG_BYTES = 2400
#: The kernel's send buffer (bytes); small so a stalled link backs up where we can see it.
SOCKET_SNDBUF = 16 * 1024


# ------------------------------------------------------------------------------------------------
# The conversation
# ------------------------------------------------------------------------------------------------


@dataclass
class RemoteStats:
    frames_sent: int = 0
    frames_dropped: int = 0  # mic frames dropped before sending (the connection could not take them)
    frames_received: int = 0  # 80 ms frames of Moshi's audio
    text_pieces: int = 0
    bad_audio: int = 0  # undecodable audio messages (the decoder is reset)
    bad_messages: int = 0  # empty or oversized messages, unknown control codes
    server_errors: int = 0  # 0x05 messages after the handshake
    server: dict[str, Any] = field(default_factory=dict)  # the server's latest stats metadata, if it sends any
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=100_000))

    @property
    def last_latency_ms(self) -> float:
        return self.latencies_ms[-1] if self.latencies_ms else 0.0

    @property
    def server_dropped(self) -> int:
        """Frames the server skipped or did not send (only servers that report it, like ours)."""
        return _count(self.server.get("dropped_in")) + _count(self.server.get("dropped_out"))


def _count(value: Any) -> int:
    """A count from a server's JSON; anything but a non-negative finite number reads as 0 (a server's stats are
    its own: a null or a string there must not end the conversation)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


class RemoteConversation:
    """One conversation over one WebSocket.

    on_audio(frame): each 1920-sample float32 frame of Moshi's audio (event loop thread).
    on_text(piece): each transcript piece.
    on_notice(message): server errors after the handshake and other things worth a line.
    on_info(dict): metadata messages (our server sends its model and settings, then stats).

    :meth:`push_mic` may be called from any thread (a PortAudio callback) and never blocks.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        on_audio: Callable[[np.ndarray], None],
        on_text: Callable[[str], None] = lambda piece: None,
        on_notice: Callable[[str], None] = lambda message: None,
        on_info: Callable[[dict], None] = lambda info: None,
        ssl_context: ssl.SSLContext | None = None,
        max_unsent: int = 2,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 30.0,
        heartbeat: float | None = 10.0,
    ) -> None:
        self.url = url if isinstance(url, URL) else chat_url(url)
        self.on_audio, self.on_text, self.on_notice, self.on_info = on_audio, on_text, on_notice, on_info
        self.ssl_context = ssl_context
        self.max_unsent = max(1, max_unsent)
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.heartbeat = heartbeat
        self.stats = RemoteStats()
        self.handshake: protocol.Handshake | None = None
        self.started = 0.0
        self._opus = OpusFrames()
        self._unsent: deque[tuple[float, np.ndarray]] = deque()
        self._unsent_lock = threading.Lock()
        self._sent_at: deque[float] = deque(maxlen=4096)  # capture times of the latest sent frames
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._closing = False
        self._last_bad_audio_notice = -1e9
        self.last_server_error = ""

    # -- connection ------------------------------------------------------------------------------
    @property
    def where(self) -> str:
        port = f":{self.url.port}" if self.url.port else ""
        return f"{self.url.host}{port}"

    async def connect(self) -> protocol.Handshake:
        """Open the WebSocket and wait for the handshake; raises a :class:`ClientError` otherwise."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=None, connect=self.connect_timeout, sock_connect=self.connect_timeout)
        self._session = aiohttp.ClientSession(timeout=timeout)
        try:
            self._ws = await self._open()
            self._tune_socket()
            self.handshake = await self._await_handshake()
        except BaseException:
            await self.close()
            raise
        self.started = time.monotonic()
        return self.handshake

    async def _open(self) -> aiohttp.ClientWebSocketResponse:
        assert self._session is not None
        secure = self.url.scheme == "wss"
        try:
            return await self._session.ws_connect(
                self.url, ssl=self.ssl_context if secure and self.ssl_context is not None else True,
                heartbeat=self.heartbeat, max_msg_size=4 * protocol.MAX_MESSAGE_BYTES, autoping=True,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            failure = connect_failure(e, self.url, self.connect_timeout)
            if failure is None:
                raise
            raise failure from None

    def _tune_socket(self) -> None:
        sock = self._ws.get_extra_info("socket") if self._ws is not None else None
        if isinstance(sock, socket.socket):
            try:  # sent audio must not pile up unseen in a large kernel buffer on a slow link
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SNDBUF)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    async def _await_handshake(self) -> protocol.Handshake:
        assert self._ws is not None
        deadline = time.monotonic() + self.handshake_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolFailure(f"{self.where} sent no handshake within {self.handshake_timeout:g} s")
            try:
                msg = await self._ws.receive(timeout=left)
            except asyncio.TimeoutError:
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                raise ConnectionLost(f"{self.where} closed the connection before the handshake{close_reason(self._ws)}")
            if msg.type == aiohttp.WSMsgType.ERROR:
                raise ConnectionLost(f"connection to {self.where} failed before the handshake: {first_line(msg.data)}")
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise ProtocolFailure(f"{self.where} sent a {msg.type.name.lower()} WebSocket frame; "
                                      "Kyutai's protocol uses binary messages only")
            try:
                message = protocol.decode(msg.data)
            except ProtocolError as e:
                raise ProtocolFailure(f"{self.where} sent a bad first message: {e}") from None
            if message is None or message.kind == Kind.PING:
                continue
            if message.kind == Kind.ERROR:
                raise ServerRefused(f"{self.where} refused the conversation: {message_text(message)}")
            if message.kind != Kind.HANDSHAKE:
                raise ProtocolFailure(
                    f"{self.where} sent {message.kind.name.lower()} before the handshake; is this a Moshi server?"
                )
            try:
                return protocol.decode_handshake(message)
            except ProtocolError as e:
                raise ProtocolFailure(f"{self.where}: {e}") from None

    async def close(self) -> None:
        """Close the WebSocket (normal closure) and the HTTP session; safe to call twice."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed:
            try:
                await asyncio.wait_for(ws.close(), 2.0)
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError, RuntimeError):
                pass
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- microphone (any thread) -------------------------------------------------------------------
    def push_mic(self, frame: np.ndarray) -> None:
        """Queue one 80 ms mic frame for sending; the oldest unsent one is dropped when the queue is full."""
        if self._closing or self._loop is None:
            return
        item = (time.monotonic(), np.ascontiguousarray(frame, dtype=np.float32).reshape(-1))
        with self._unsent_lock:
            if len(self._unsent) >= self.max_unsent:
                self._unsent.popleft()
                self.stats.frames_dropped += 1
            self._unsent.append(item)
        try:
            self._loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:  # loop closed: we are shutting down
            pass

    @property
    def unsent_frames(self) -> int:
        return len(self._unsent)

    # -- running ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Stream both ways until :meth:`close` (returns) or the connection ends (raises ConnectionLost)."""
        assert self._ws is not None, "connect() first"
        sender = asyncio.ensure_future(self._send_loop())
        try:
            await self._receive_loop()
        finally:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):
                pass

    def _backlog(self) -> int:
        """Bytes waiting in the connection's send buffer (0 where it cannot be seen)."""
        # aiohttp has no public accessor; its writer holds the transport (TLS or plain).
        transport = getattr(getattr(self._ws, "_writer", None), "transport", None)
        try:
            return int(transport.get_write_buffer_size()) if transport is not None else 0
        except (AttributeError, RuntimeError, ValueError):
            return 0

    async def _send_loop(self) -> None:
        assert self._wakeup is not None
        while not self._closing:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._ws is not None and not self._closing:
                if self._backlog() > SEND_BACKLOG_BYTES:  # the link is behind: frames wait (and age out)
                    await asyncio.sleep(FRAME_S / 4)
                    continue
                with self._unsent_lock:
                    if not self._unsent:
                        break
                    captured, frame = self._unsent.popleft()
                page = self._opus.encode(frame)
                self._sent_at.append(captured)
                self.stats.frames_sent += 1
                if page:
                    try:
                        await self._ws.send_bytes(protocol.encode_audio(page))
                    except (ConnectionError, aiohttp.ClientError, RuntimeError):
                        return  # the receive loop reports the lost connection

    async def _receive_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                self._on_binary(msg.data)
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                if self._closing:
                    return
                after = time.monotonic() - self.started
                said = f"; the server said: {self.last_server_error}" if self.last_server_error else ""
                raise ConnectionLost(f"connection to {self.where} lost after {after:.1f} s{close_reason(ws)}{said}")
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.stats.bad_messages += 1  # not part of the protocol; say so once
                if self.stats.bad_messages == 1:
                    self.on_notice("the server sent a text WebSocket frame (not part of the protocol); ignored")

    def _on_binary(self, data: bytes) -> None:
        try:
            message = protocol.decode(data, 4 * protocol.MAX_MESSAGE_BYTES)
        except ProtocolError:
            self.stats.bad_messages += 1
            return
        if message is None:  # a kind this client does not know: ignored, as the protocol says
            return
        if message.kind == Kind.AUDIO:
            self._on_audio(message.payload)
        elif message.kind == Kind.TEXT:
            try:
                piece = message.text
            except ProtocolError:
                self.stats.bad_messages += 1
                return
            self.stats.text_pieces += 1
            self.on_text(piece)
        elif message.kind == Kind.ERROR:
            self.stats.server_errors += 1
            self.last_server_error = message_text(message)
            self.on_notice(f"server: {self.last_server_error}")
        elif message.kind == Kind.METADATA:
            try:
                info = message.json()
            except ProtocolError:
                self.stats.bad_messages += 1
                return
            if info.get("type") == "stats":
                self.stats.server = info
            self.on_info(info)
        # handshake (again), control and ping carry nothing a client acts on

    def _on_audio(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            frames = self._opus.decode(payload)
        except OpusDecodeError as e:
            self.stats.bad_audio += 1
            now = time.monotonic()
            if now - self._last_bad_audio_notice > 5.0:
                self._last_bad_audio_notice = now
                self.on_notice(f"could not decode the server's audio ({e}); decoder reset")
            return
        for frame in frames:
            self._note_latency()
            self.stats.frames_received += 1
            self.on_audio(frame)

    def _note_latency(self) -> None:
        """Mic capture of the frame this one answers -> now (frame k out answers frame k in)."""
        first = self.stats.frames_sent - len(self._sent_at)  # index of _sent_at[0]
        index = self.stats.frames_received + self.stats.server_dropped - first
        if 0 <= index < len(self._sent_at):
            self.stats.latencies_ms.append((time.monotonic() - self._sent_at[index]) * 1e3)
