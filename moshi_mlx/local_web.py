"""Talk to Moshi in the browser: ``python -m moshi_mlx.local_web -q 4`` (``--demo`` needs no download).

An aiohttp server on localhost serves the UI from the repository's ``web/`` folder and speaks Kyutai's
WebSocket protocol (see :mod:`moshi_mlx.net.protocol`) at ``/api/chat``:

* the server sends the handshake (``b"\\x00"``) once the model is ready for this client, then a
  metadata message (model, settings in use, ignored parameters) and, once a second, another with
  live statistics (frames in/out, frames skipped, latency);
* the client streams Ogg/Opus pages of its microphone (24 kHz mono); they are decoded with ``sphn``,
  re-chunked into 80 ms frames and pushed into an :class:`~moshi_mlx.engine.EngineRunner`, which
  skips the oldest frames when the model falls behind;
* Moshi's audio goes back as Ogg/Opus pages, its words as text messages.

One conversation at a time: a second client gets an error (``busy``) and is closed; the engine is
reset for every conversation. Malformed messages, undecodable audio, clients that vanish or stop
reading never take the server down: errors are reported (kind 0x05), the outgoing queue is bounded
(Moshi's audio is dropped rather than buffered without end) and a heartbeat closes dead peers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
import webbrowser
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any, Callable

import numpy as np
from aiohttp import WSMsgType, web

from . import cli
from .audio.frames import FRAME_SIZE, SAMPLE_RATE, FrameChunker
from .engine import ConversationEngine, EngineRunner, EngineSettings, FrameResult
from .errors import MoshiError, first_line
from .net import protocol
from .net.protocol import Kind, ParamError, ProtocolError
from .server.info import knobs_info, server_info
from .server.security import (
    FOREIGN_UI,
    HostPolicy,
    QuietHttpErrors,
    add_security_headers,
    hide_server_version,
    host_guard,
    parse_origin,
    ui_file,
)

log = logging.getLogger("moshi_mlx.web")

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8998
PACKAGE_DIR = Path(__file__).resolve().parent


class WebUiMissing(MoshiError, RuntimeError):
    pass


def find_web_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding the UI (index.html): ``explicit``, $MOSHI_MLX_WEB_DIR, <package>/web or <repo>/web.

    An installed wheel carries the UI as ``moshi_mlx/web/``; an editable install from a clone has
    none there and uses the repository's ``web/`` beside the package.
    """
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("MOSHI_MLX_WEB_DIR"):
        candidates.append(Path(os.environ["MOSHI_MLX_WEB_DIR"]))
    else:
        candidates += [PACKAGE_DIR / "web", PACKAGE_DIR.parent / "web"]
    for c in candidates:
        if (c / "index.html").is_file():
            return c.resolve()
    where = ", ".join(str(c) for c in candidates)
    raise WebUiMissing(
        f"the web UI was not found (looked for index.html in {where}); reinstall the package, or point "
        "--web-dir / MOSHI_MLX_WEB_DIR at a folder holding the UI"
    )


# ------------------------------------------------------------------------------------------------
# Outgoing messages
# ------------------------------------------------------------------------------------------------


class OutQueue:
    """Messages waiting to be sent to one client, bounded.

    Audio is limited to ``max_audio`` queued messages (about that many 80 ms frames): a client that
    reads too slowly loses Moshi's audio instead of making the server buffer it. Other messages
    (text, metadata, errors) are small and rare; they are limited to ``max_total`` in all.
    """

    def __init__(self, max_audio: int = 12, max_total: int = 512) -> None:
        self.max_audio = max_audio
        self.max_total = max_total
        self._items: deque[tuple[bool, bytes]] = deque()
        self._audio = 0
        self.dropped_audio = 0
        self.dropped_other = 0
        self.high_water = 0
        self._wakeup = asyncio.Event()

    @property
    def audio_backlog(self) -> int:
        return self._audio

    def __len__(self) -> int:
        return len(self._items)

    def audio_full(self) -> bool:
        return self._audio >= self.max_audio

    def put(self, message: bytes, audio: bool = False) -> bool:
        if audio and self.audio_full():
            self.dropped_audio += 1
            return False
        if len(self._items) >= self.max_total:
            if audio:
                self.dropped_audio += 1
            else:
                self.dropped_other += 1
            return False
        self._items.append((audio, message))
        self._audio += audio
        self.high_water = max(self.high_water, len(self._items))
        self._wakeup.set()
        return True

    def get_nowait(self) -> bytes | None:
        if not self._items:
            return None
        audio, message = self._items.popleft()
        self._audio -= audio
        return message

    async def get(self) -> bytes:
        while True:
            message = self.get_nowait()
            if message is not None:
                return message
            self._wakeup.clear()
            await self._wakeup.wait()


# ------------------------------------------------------------------------------------------------
# One conversation
# ------------------------------------------------------------------------------------------------


class Conversation:
    """One client's session: protocol in and out around the shared engine's runner."""

    def __init__(
        self,
        server: "ChatServer",
        ws: web.WebSocketResponse,
        query: protocol.QueryResult,
        peer: str,
    ) -> None:
        import sphn

        self._sphn = sphn
        self.server = server
        self.ws = ws
        self.query = query
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.out = OutQueue(max_audio=server.max_audio_backlog)
        self.reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self.writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        self.chunker = FrameChunker()
        self.runner: EngineRunner | None = None
        self.closing = False
        self.started = time.monotonic()
        self.failure: str | None = None
        # counters
        self.messages_in = 0
        self.audio_bytes_in = 0
        self.frames_pushed = 0
        self.bad_audio = 0
        self.bad_messages = 0
        self.text_pieces = 0
        self.audio_frames_out = 0
        self.not_encoded = 0  # Moshi's frames skipped because the client did not keep up (decode thread)
        self._last_error_sent: dict[str, float] = {}
        self._tasks: list[asyncio.Task] = []
        # Every metadata message starts with these (Kyutai's client checks each one against its schema).
        self.server_fields = server_info(query.describe(), server.lm_model_file)

    # -- engine side (worker threads) ------------------------------------------------------
    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: the server is going away
            pass

    def on_result(self, result: FrameResult) -> None:
        """Called on the engine's decode thread for every answered frame."""
        if self.closing:
            return
        page = b""
        if not self.out.audio_full():
            try:
                page = self.writer.append_pcm(np.ascontiguousarray(result.pcm, dtype=np.float32).reshape(-1))
            except Exception as e:  # never let the codec kill the engine thread
                self._call(self._send_error, f"could not encode Moshi's audio: {first_line(e)}", "encode")
        else:
            self.not_encoded += 1  # skipped before encoding: the Ogg stream stays continuous
        self._call(self._deliver, page, result.text)

    def on_error(self, error: BaseException) -> None:
        self._call(self._fail, f"the model failed: {first_line(error)}")

    # -- event loop side -------------------------------------------------------------------
    def _deliver(self, page: bytes, text: str | None) -> None:
        if self.closing:
            return
        if page:
            if self.out.put(protocol.encode_audio(page), audio=True):
                self.audio_frames_out += 1
        if text:
            self.text_pieces += 1
            self.out.put(protocol.encode_text(text))

    def _send_error(self, message: str, key: str | None = None, every_s: float = 1.0) -> None:
        """Queue an error message; repeated errors of one ``key`` are sent at most once per ``every_s``."""
        key = key or message
        now = time.monotonic()
        if now - self._last_error_sent.get(key, -1e9) < every_s:
            return
        self._last_error_sent[key] = now
        self.out.put(protocol.encode_error(message))

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            log.error("%s: %s", self.peer, message)
            self.out.put(protocol.encode_error(message))
            self._tasks.append(asyncio.ensure_future(self._close_soon()))

    async def _close_soon(self) -> None:
        await asyncio.sleep(0.2)  # let the error message go out first
        await self.ws.close(code=1011, message=b"server error")

    @property
    def dropped_out(self) -> int:
        """Frames of Moshi's audio not sent because the client read too slowly."""
        return self.out.dropped_audio + self.not_encoded

    def stats(self) -> dict[str, Any]:
        st = self.runner.stats if self.runner is not None else None
        steps = list(st.recent_step_ms) if st is not None else []
        return {
            **self.server_fields,
            "type": "stats",
            "seconds": round(time.monotonic() - self.started, 1),
            "frames_in": st.frames_in if st else 0,
            "frames_out": st.frames_out if st else 0,
            "dropped_in": st.dropped if st else 0,
            "dropped_out": self.dropped_out,
            "latency_ms": round(st.last_latency_ms, 1) if st else 0.0,
            "step_ms": round(median(steps), 1) if steps else None,
            "behind": bool(st.behind) if st else False,
            "bad_audio": self.bad_audio,
            "send_queue": len(self.out),
        }

    def info(self) -> dict[str, Any]:
        return {
            **self.server_fields,
            "type": "info",
            "server": "moshi_mlx",
            "model": self.server.description,
            "demo": self.server.demo,
            "sample_rate": SAMPLE_RATE,
            "frame_size": FRAME_SIZE,
            "settings": self.query.describe(),
            "ignored_params": self.query.ignored,
            "unknown_params": list(self.query.unknown),
        }

    def on_binary(self, data: bytes) -> None:
        self.messages_in += 1
        try:
            message = protocol.decode(data, self.server.max_message_bytes)
        except ProtocolError as e:
            self.bad_messages += 1
            self._send_error(f"{e}; ignored", key=type(e).__name__)
            return
        if message is None:  # unknown kind: ignored, as the protocol says
            return
        if message.kind == Kind.AUDIO:
            self.on_audio(message.payload)
        elif message.kind == Kind.CONTROL:
            try:
                log.debug("%s: control %r", self.peer, message.control())
            except ProtocolError as e:
                self.bad_messages += 1
                self._send_error(f"{e}; ignored", key="protocol")
        # Text, metadata, handshake and ping from a client carry nothing we act on.

    def on_audio(self, payload: bytes) -> None:
        if not payload:
            return
        self.audio_bytes_in += len(payload)
        try:
            pcm = self.reader.append_bytes(payload)
        except Exception as e:  # sphn raises ValueError; after any error its reader is unusable
            self.bad_audio += 1
            self.reader = self._sphn.OpusStreamReader(SAMPLE_RATE)
            self._send_error(f"could not decode audio ({first_line(e)}); the Opus decoder was reset", key="audio")
            return
        if self.runner is None:
            return
        for frame in self.chunker.push(pcm):
            self.frames_pushed += 1
            self.runner.push(frame)

    async def _sender(self) -> None:
        try:
            while True:
                message = await self.out.get()
                await self.ws.send_bytes(message)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        except Exception as e:  # pragma: no cover - defensive
            log.debug("%s: send failed: %s", self.peer, e)

    async def _stats_loop(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.server.stats_interval)
                if not self.closing:
                    self.out.put(protocol.encode_metadata(self.stats()))
        except asyncio.CancelledError:
            pass

    async def run(self) -> None:
        """Serve the client until it leaves (the engine has already been reset for it)."""
        self.runner = EngineRunner(
            self.server.engine, self.on_result, max_pending=self.server.max_pending, on_error=self.on_error
        )
        self.runner.start()
        # The handshake must be the first message; send it directly, then the rest via the queue.
        await self.ws.send_bytes(protocol.encode_handshake())
        self.out.put(protocol.encode_metadata(self.info()))
        self._tasks += [asyncio.ensure_future(self._sender()), asyncio.ensure_future(self._stats_loop())]
        warned_text = False
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                self.on_binary(msg.data)
            elif msg.type == WSMsgType.TEXT:
                self.bad_messages += 1
                if not warned_text:
                    warned_text = True
                    self._send_error("text WebSocket frames are not part of the protocol; use binary messages")
            elif msg.type == WSMsgType.ERROR:
                log.info("%s: connection error: %s", self.peer, msg.data)
                break

    async def stop_io(self) -> None:
        """Stop the background tasks and close the socket (never waits long on a stuck peer)."""
        self.closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except BaseException:
                pass
        self._tasks.clear()
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(), 2.0)
            except (asyncio.TimeoutError, Exception):
                pass


# ------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------


def _parsed(origin: str) -> tuple[str, str, int] | None:
    try:
        return parse_origin(origin)
    except ValueError:
        return None


class ChatSocket(web.WebSocketResponse):
    """A WebSocket that says why (0x05) before aiohttp closes it for a message over ``max_msg_size``.

    Messages between the protocol's limit and ``max_msg_size`` are refused one by one by
    :func:`protocol.decode`; larger ones are cut off by aiohttp's reader before being buffered.
    """

    def __init__(self, *, protocol_limit: int, max_msg_size: int, **kwargs: Any) -> None:
        super().__init__(max_msg_size=max_msg_size, **kwargs)
        self.protocol_limit = protocol_limit
        self.transport_limit = max_msg_size

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        if code == 1009 and not self.closed:  # MESSAGE_TOO_BIG, from aiohttp's reader
            text = (
                f"message of more than {self.transport_limit} bytes is larger than the limit of "
                f"{self.protocol_limit}; closing"
            )
            try:
                await self.send_bytes(protocol.encode_error(text))
            except Exception:
                pass
        return await super().close(code=code, message=message, drain=drain)


class ChatServer:
    """Owns the engine and admits one conversation at a time."""

    def __init__(
        self,
        engine: ConversationEngine,
        *,
        description: str = "",
        demo: bool = False,
        max_pending: int = 2,
        max_audio_backlog: int = 12,
        max_message_bytes: int = protocol.MAX_MESSAGE_BYTES,
        heartbeat: float = 10.0,
        stats_interval: float = 1.0,
        check_origin: bool = True,
        default_settings: EngineSettings | None = None,
        lm_model_file: str = "",
        policy: HostPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.lm_model_file = lm_model_file
        # Settings for parameters a client leaves out (the command line's, by default).
        self.default_settings: EngineSettings = default_settings or engine.settings
        self.description = description
        self.demo = demo
        self.max_pending = max_pending
        self.max_audio_backlog = max_audio_backlog
        self.max_message_bytes = max_message_bytes
        self.heartbeat = heartbeat
        self.stats_interval = stats_interval
        self.check_origin = check_origin
        # Host allow-list and allowed Origins (see moshi_mlx.server.security).
        self.policy = policy or HostPolicy()
        # Engine resets and runner shutdowns happen here, one at a time, off the event loop.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshi-web")
        self.active: Conversation | None = None
        self._idle: asyncio.Event | None = None
        self.conversations = 0
        self.refused_busy = 0

    def idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    def close(self) -> None:
        conv = self.active
        if conv is not None and conv.runner is not None:
            conv.closing = True
            conv.runner.stop(timeout=5.0)
        self.executor.shutdown(wait=True)
        self.engine.close()

    # -- HTTP --------------------------------------------------------------------------------
    async def handle_info(self, request: web.Request) -> web.Response:
        response = web.json_response(
            {
                "server": "moshi_mlx",
                "model": self.description,
                "demo": self.demo,
                "busy": self.active is not None,
                "conversations": self.conversations,
                "threads": threading.active_count(),
                "protocol": {"sample_rate": SAMPLE_RATE, "params": list(protocol.KNOWN_PARAMS)},
                "defaults": protocol.QueryResult(self.default_settings).describe(),
                "knobs": knobs_info(),
            }
        )
        origin = request.headers.get("Origin")
        if origin and _parsed(origin) in self.policy.origins:  # a client hosted on an --allow-origin
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    def _origin_ok(self, request: web.Request) -> bool:
        if not self.check_origin:
            return True
        return self.policy.origin_ok(request.headers.get("Origin"), request.secure, request.host)

    async def _refuse(self, ws: web.WebSocketResponse, message: str, code: int) -> web.WebSocketResponse:
        try:
            await ws.send_bytes(protocol.encode_error(message))
            await asyncio.wait_for(ws.close(code=code, message=message[:100].encode()), 2.0)
        except Exception:
            pass
        return ws

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        if not self._origin_ok(request):
            return web.Response(status=403, text="cross-origin WebSocket connections are refused\n")
        ws = ChatSocket(
            heartbeat=self.heartbeat, protocol_limit=self.max_message_bytes,
            max_msg_size=max(4 * self.max_message_bytes, 1 << 20),
        )
        await ws.prepare(request)
        peer = request.remote or "?"
        try:
            query = protocol.parse_query(request.query, self.default_settings)
        except ParamError as e:
            log.info("%s: refused: %s", peer, e)
            return await self._refuse(ws, f"bad parameter: {e}", 1008)

        idle = self.idle_event()
        active = self.active
        if active is not None and (active.closing or active.ws.closed):
            try:  # the previous client is leaving: wait for its cleanup rather than say busy
                await asyncio.wait_for(idle.wait(), 15.0)
            except asyncio.TimeoutError:
                pass
        if self.active is not None:
            self.refused_busy += 1
            log.info("%s: refused: busy", peer)
            return await self._refuse(ws, "busy: another conversation is in progress; try again later", 1013)

        conv = Conversation(self, ws, query, peer)
        self.active = conv
        idle.clear()
        self.conversations += 1
        loop = asyncio.get_running_loop()
        log.info("%s: conversation %d starts (%s)", peer, self.conversations, query.describe())
        stop_future = None
        try:
            await loop.run_in_executor(self.executor, self.engine.reset, query.settings)
            await conv.run()
        except ConnectionError:  # the client left while we were talking to it
            pass
        except Exception as e:
            log.exception("%s: conversation failed", peer)
            conv.failure = conv.failure or f"server error: {first_line(e)}"
            try:  # directly: the sender task may not be running yet
                await asyncio.wait_for(ws.send_bytes(protocol.encode_error(conv.failure)), 2.0)
                await asyncio.wait_for(ws.close(code=1011, message=b"server error"), 2.0)
            except Exception:
                pass
        finally:
            conv.closing = True
            runner = conv.runner
            stop_future = loop.run_in_executor(self.executor, runner.stop, 30.0) if runner else None

            def release(_: object = None) -> None:
                if self.active is conv:
                    self.active = None
                    idle.set()
                st = runner.stats if runner else None
                log.info(
                    "%s: conversation ends after %.1f s: %d frames in, %d answered, %d skipped, %d audio dropped",
                    peer, time.monotonic() - conv.started, st.frames_in if st else 0,
                    st.frames_out if st else 0, st.dropped if st else 0, conv.dropped_out,
                )

            if stop_future is None:
                release()
            else:
                stop_future.add_done_callback(release)
            await asyncio.shield(self._finish(conv, stop_future))
        return ws

    async def _finish(self, conv: Conversation, stop_future: "asyncio.Future | None") -> None:
        await conv.stop_io()
        if stop_future is not None:
            await stop_future


CHAT_SERVER = web.AppKey("chat_server", ChatServer)
WEB_DIR = web.AppKey("web_dir", Path)


def create_app(server: ChatServer, web_dir: str | os.PathLike | None = None) -> web.Application:
    """The aiohttp application: UI files, ``/api/chat`` (WebSocket) and ``/api/info`` (JSON)."""
    root = find_web_dir(web_dir)
    index = root / "index.html"
    hide_server_version()
    app = web.Application(
        middlewares=[host_guard(server.policy)],
        handler_args={"logger": QuietHttpErrors(logging.getLogger("aiohttp.server"), {})},
    )
    ours = {(PACKAGE_DIR / "web").resolve(), (PACKAGE_DIR.parent / "web").resolve()}
    app[FOREIGN_UI] = root not in ours

    async def handle_index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(index)

    async def handle_file(request: web.Request) -> web.FileResponse:
        path = ui_file(root, request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def no_cache(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Cache-Control", "no-cache")

    async def on_shutdown(app: web.Application) -> None:
        conv = server.active
        if conv is not None and not conv.ws.closed:
            try:
                await asyncio.wait_for(conv.ws.close(code=1001, message=b"server shutting down"), 2.0)
            except Exception:
                pass

    app.on_response_prepare.append(no_cache)
    app.on_response_prepare.append(add_security_headers)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/api/chat", server.handle_chat)
    app.router.add_get("/api/info", server.handle_info)
    app.router.add_get("/", handle_index)
    app.router.add_get("/{path:.+}", handle_file)  # only the UI's files (web_security.ui_file)
    app[CHAT_SERVER] = server
    app[WEB_DIR] = root
    return app


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .cli.flags import add_engine_args, add_lag_arg

    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.local_web",
        description="Talk to Moshi in your browser: serves the web UI and Kyutai's WebSocket protocol locally.",
    )
    add_engine_args(p)
    g = p.add_argument_group("web server")
    g.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    g.add_argument("--port", type=cli.integer(0, 65535), default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    g.add_argument(
        "--ssl", metavar="auto|DIR", default=None,
        help="serve https/wss (browsers only allow the microphone on localhost or over https): 'auto' makes "
        "a self-signed certificate for this machine on first use and keeps it in your config folder; "
        "DIR uses DIR/cert.pem and DIR/key.pem",
    )
    g.add_argument(
        "--allow-origin", metavar="ORIGIN", action="append", default=[], type=_origin_arg,
        help="also let pages from ORIGIN (e.g. http://localhost:5173) open the WebSocket; repeatable "
        "(default: same origin only)",
    )
    g.add_argument("--no-browser", action="store_true", help="do not open the browser")
    g.add_argument("--web-dir", default=None, help="folder with the UI (default: the repository's web/)")
    add_lag_arg(g)
    return p


def _origin_arg(value: str) -> str:
    try:
        parse_origin(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def ssl_context(directory: str | os.PathLike) -> ssl.SSLContext:
    d = Path(directory)
    cert, key = d / "cert.pem", d / "key.pem"
    for f in (cert, key):
        if not f.is_file():
            raise FileNotFoundError(
                f"--ssl {d}: {f} not found; create a self-signed pair with: openssl req -x509 -newkey rsa:2048 "
                f"-nodes -days 365 -subj /CN=localhost -keyout {key} -out {cert}"
            )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise ValueError(f"--ssl {d}: could not load cert.pem/key.pem: {e}") from None
    return ctx


def _ssl_setup(option: str | None, host: str) -> tuple[ssl.SSLContext | None, Callable[[int], None] | None]:
    """--ssl auto|DIR: the server's SSL context, and what to tell the user once the port is known."""
    if not option:
        return None, None
    if option != "auto":
        return ssl_context(option), None
    from .net import tls

    info = tls.ensure_certificate()
    ctx = tls.server_context(info.cert, info.key)
    made = "made a new" if info.created else "using the"
    log.info("%s self-signed certificate %s", made, info.cert)
    log.info("certificate SHA-256 fingerprint: %s", info.fingerprint)

    def announce(port: int) -> None:
        if host in ("localhost", "127.0.0.1", "::1"):
            log.info("other devices cannot reach %s; add --host 0.0.0.0 to serve the LAN", host)
            return
        lan = [a for a in info.addresses if not a.startswith("127.") and a != "::1"]
        if host == "0.0.0.0":  # IPv4 only
            lan = [a for a in lan if ":" not in a]
        shown = lan if host in ("", "0.0.0.0", "::") else [host]
        for addr in shown:
            log.info("from another device: %s  (accept the certificate warning after checking the fingerprint)",
                     browser_url(addr, port, True))

    return ctx, announce


def browser_url(host: str, port: int, secure: bool) -> str:
    shown = "localhost" if host in ("", "0.0.0.0", "::", "localhost") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"{'https' if secure else 'http'}://{shown}:{port}/"


async def serve(
    app: web.Application, host: str, port: int, ssl_ctx: ssl.SSLContext | None, open_browser: bool,
    announce: Callable[[int], None] | None = None,
) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e} (is another server running? try --port)") from None
    if port == 0:  # an ephemeral port: say which one we got
        sockets = getattr(site._server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else port
    url = browser_url(host, port, ssl_ctx is not None)
    log.info("open %s in your browser (Ctrl-C to quit)", url)
    if announce is not None:
        announce(port)
    if open_browser:
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop.set)  # a clean shutdown on `kill`, like Ctrl-C
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        pass
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("server stopped")


def check_port_free(host: str, port: int) -> None:
    """Fail before the (slow) model load if the address cannot be bound."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            if os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                if family == socket.AF_INET6 and e.errno in (99, 97):  # no IPv6 here: aiohttp skips it too
                    continue
                raise OSError(
                    f"cannot listen on {host}:{port}: {e.strerror or e} (is another server running? try --port)"
                ) from None


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    from .cli.flags import load_from_args, settings_from_args

    server: ChatServer | None = None
    try:
        web_dir = find_web_dir(args.web_dir)  # fail before the (slow) model load
        ssl_ctx, announce = _ssl_setup(args.ssl, args.host)
        check_port_free(args.host, args.port)
        t0 = time.perf_counter()
        assets = load_from_args(args)
        engine = assets.engine(settings_from_args(args))
        load_s = time.perf_counter() - t0
        warm_s = engine.warmup()
        log.info("ready in %.1f s (load %.1f s, warm-up %.1f s): %s", load_s + warm_s, load_s, warm_s, assets.description)
        server = ChatServer(
            engine, description=assets.description, demo=assets.demo, max_pending=args.max_lag_frames,
            lm_model_file=assets.lm_file,
            policy=HostPolicy(args.host, args.allow_origin),
        )
        app = create_app(server, web_dir)
        asyncio.run(serve(app, args.host, args.port, ssl_ctx, not args.no_browser, announce))
        return 0
    finally:
        if server is not None:
            server.close()


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
