"""Our web server on a real socket for a test, speech to talk to it, and the WebSocket helpers that drive it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import sphn
from aiohttp import WSMsgType, web  # noqa: E402

from moshi_mlx.net import protocol  # noqa: E402
from moshi_mlx.net.protocol import Kind  # noqa: E402
from moshi_mlx.server.app import ChatServer, create_app  # noqa: E402
from moshi_mlx.settings import EngineSettings  # noqa: E402

SR = 24000


SPEECH_TEXT = "Hello, this is a test of the speech dialogue system. Can you hear me?"


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        rate, width, ch = w.getframerate(), w.getsampwidth(), w.getnchannels()
        data = w.readframes(w.getnframes())
    assert width == 2, "espeak-ng writes 16-bit PCM"
    x = np.frombuffer(data, dtype="<i2").astype(np.float32).reshape(-1, ch).mean(axis=1) / 32768.0
    return x, rate


def _resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return x.astype(np.float32)
    n = int(round(len(x) * dst / src))
    return np.interp(np.arange(n) * (src / dst), np.arange(len(x)), x).astype(np.float32)


def make_speech(tmp_dir: Path, rate: int = SR) -> np.ndarray:
    """Spoken English from espeak-ng at ``rate`` (a synthetic vowel-like signal if espeak-ng is missing)."""
    if shutil.which("espeak-ng"):
        raw = tmp_dir / "espeak.wav"
        subprocess.run(
            ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), SPEECH_TEXT], check=True, capture_output=True
        )
        x, src = _read_wav(raw)
        return _resample(x, src, rate)
    t = np.arange(int(4.0 * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (0.2 * voice / np.abs(voice).max()).astype(np.float32)


def write_wav(path: Path, x: np.ndarray, rate: int) -> Path:
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def opus_messages(pcm: np.ndarray, chunk: int = 960) -> list[bytes]:
    """Protocol audio messages (0x01 + Ogg pages) for ``pcm``, ``chunk`` samples per page."""
    writer = sphn.OpusStreamWriter(SR)
    out = []
    for i in range(0, len(pcm), chunk):
        piece = pcm[i : i + chunk]
        if len(piece) < chunk:
            piece = np.pad(piece, (0, chunk - len(piece)))
        page = writer.append_pcm(np.ascontiguousarray(piece, dtype=np.float32))
        if page:
            out.append(protocol.encode_audio(page))
    return out


class Running:
    def __init__(self, server: ChatServer, runner: web.AppRunner, port: int):
        self.server, self.runner, self.port = server, runner, port

    def url(self, path: str = "/api/chat", query: str = "") -> str:
        scheme = "ws" if path == "/api/chat" else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}{'?' + query if query else ''}"


async def start_server(engine, **kwargs) -> Running:
    kwargs.setdefault("default_settings", EngineSettings())  # the shared engine keeps the last client's
    server = ChatServer(engine, description="test demo", demo=True, **kwargs)
    app = create_app(server)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return Running(server, runner, port)


async def stop_server(running: Running) -> None:
    await running.runner.cleanup()
    await asyncio.get_running_loop().run_in_executor(None, running.server.close)


async def receive(ws, timeout: float = 10.0):
    msg = await asyncio.wait_for(ws.receive(), timeout)
    return msg


async def expect_handshake(ws, timeout: float = 15.0) -> None:
    msg = await receive(ws, timeout)
    assert msg.type == WSMsgType.BINARY, msg
    assert msg.data == b"\x00", f"first message must be the bare handshake, got {msg.data[:20]!r}"


async def until_closed(ws, timeout: float = 10.0) -> list[protocol.Message]:
    """Read everything until the server closes; return the protocol messages seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        msg = await receive(ws, max(0.1, deadline - time.monotonic()))
        if msg.type == WSMsgType.BINARY:
            seen.append(protocol.decode(msg.data))
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return seen


class Collector:
    """Reads a client socket in the background and sorts what arrives."""

    def __init__(self, ws):
        self.ws = ws
        self.reader = sphn.OpusStreamReader(SR)
        self.audio_messages = 0
        self.samples = 0
        self.pcm: list[np.ndarray] = []
        self.texts: list[str] = []
        self.errors: list[str] = []
        self.metadata: list[dict] = []
        self.closed = False
        self.task = asyncio.ensure_future(self._run())

    async def _run(self):
        async for msg in self.ws:
            if msg.type != WSMsgType.BINARY:
                continue
            m = protocol.decode(msg.data)
            if m is None:
                continue
            if m.kind == Kind.AUDIO:
                self.audio_messages += 1
                pcm = self.reader.append_bytes(m.payload)
                self.samples += len(pcm)
                self.pcm.append(pcm)
            elif m.kind == Kind.TEXT:
                self.texts.append(m.text)
            elif m.kind == Kind.ERROR:
                self.errors.append(m.text)
            elif m.kind == Kind.METADATA:
                self.metadata.append(m.json())
        self.closed = True

    async def wait_for(self, cond, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            await asyncio.sleep(0.05)
        return cond()

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except BaseException:
            pass


async def stream(ws, messages: list[bytes], seconds_per_message: float = 0.04) -> None:
    """Send audio messages paced at real time (960-sample pages = 40 ms)."""
    start = time.monotonic()
    for i, m in enumerate(messages):
        await ws.send_bytes(m)
        delay = start + (i + 1) * seconds_per_message - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def abort(ws) -> None:
    """Drop the client's TCP connection without a closing handshake."""
    conn = ws._response.connection
    if conn is not None and conn.transport is not None:
        conn.transport.abort()


async def wait_idle(server: ChatServer, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while server.active is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert server.active is None, "the server did not end the conversation"
