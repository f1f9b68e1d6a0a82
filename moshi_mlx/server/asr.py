"""Kyutai's speech-to-text WebSocket (`/api/asr-streaming`, moshi-server's protocol) on an STT model.

What Unmute and Kyutai's scripts talk to (message shapes in :mod:`moshi_mlx.net.asr_protocol`). One stream at a
time: a second client gets an ``Error`` ("busy", as /api/chat says it) and is closed. Each stream gets a fresh
:class:`~moshi_mlx.transcribe.Transcriber` (the LmGen reset, Mimi reset) and all of its model work runs on the
model's MLX thread, awaited as a future: the event loop never waits on the model.

How the stream answers, as the Rust server does:

* ``Ready`` once the stream is set up;
* audio of any length is cut into 80 ms frames; each frame is one model step, answered with a ``Step`` (the extra
  heads' first probabilities, when the model has heads) and the words it settled: ``Word {text, start_time}``
  when a word's text is complete (the model wrote a non-text token after it), ``EndWord {stop_time}`` when the
  word is closed (the next end of padding, or the next word). Times are seconds of the client's audio, the
  model's delay taken back (:class:`~moshi_mlx.transcribe.WordTimer`);
* ``Marker {id}`` comes back once all the audio sent before it, and the model's delay after it, has been through
  the model: the client keeps sending audio (Kyutai's scripts send silence) for it to come back. Beyond the Rust
  server: when a marker is waiting and the client sends nothing for ``flush_idle_s``, the server feeds that
  silence itself (as if the client had sent it, so times stay in the client's time base);
* a word's text is said once: should the model continue a word after a non-text token (rare), the Word already
  sent stands and only its EndWord follows;
* a bad message (not MessagePack, unknown type, wrong fields, too long) gets an ``Error`` and the stream goes on;
  OggOpus is not supported (an ``Error``; send ``Audio``).

The client's messages are read as they come and answered in turn (the Rust server's receive and model loops): a
client may run seconds ahead of the model, its close is seen at once and what it had queued is dropped. There is
no heartbeat (a pong would wait behind that queue); a client silent for ``idle_close_s`` is closed instead.

The API key (``kyutai-api-key`` header or ``auth_id``) is accepted and not checked: this is a local server, guarded
by the Host/Origin policy of :mod:`moshi_mlx.server.security` like the rest of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable, Protocol, TypeVar, Union

import numpy as np
from aiohttp import WSMsgType, web

from ..audio.frames import FRAME_SIZE, FrameChunker
from ..errors import MoshiError, first_line
from ..generate import LmGen
from ..mlx_thread import MlxThread
from ..models.cache import DEFAULT_KV_BITS
from ..models.lm import Lm
from ..net import asr_protocol as asr
from ..settings import GREEDY
from ..transcribe import FrameEncoder, PieceSource, Transcriber
from .security import HostPolicy

log = logging.getLogger("moshi_mlx.web.asr")

#: A marker waiting and no audio for this long: the server feeds the silence the marker needs.
FLUSH_IDLE_S = 0.5
#: No message at all from the client for this long: the stream is closed and the model freed (Kyutai's batched
#: server allows 120 s without data; a client that vanished without closing holds the model until then).
IDLE_CLOSE_S = 60.0
#: How long a new client waits for a stream whose client has closed to finish (/api/chat waits as long).
LEAVER_WAIT_S = 15.0
#: Client messages read ahead of the model (a close behind them is seen at once): at most 64 x 10 s of audio.
MAX_QUEUED_MESSAGES = 64
#: What a second client is told while a stream is in progress (the words /api/chat uses).
BUSY = "busy: another transcription is in progress; try again later"
T = TypeVar("T")
#: What the reader hands the answering loop: a message, a bad message's error, or None (the client has gone).
InItem = Union["asr.InMessage", "asr.AsrProtocolError", None]


class AsrStream:
    """One client's stream: PCM in, protocol messages out. Every method runs on the model's MLX thread."""

    def __init__(self, transcriber: Transcriber) -> None:
        self.t = transcriber
        self.chunker = FrameChunker()
        self.markers: deque[tuple[int, int]] = deque()  # (input frames that must have been fed, marker id)
        self._announced = 0  # WordTimer.opened of the last word sent as Word (0: none yet)

    @property
    def buffered(self) -> int:
        """Samples waiting for a whole frame."""
        return self.chunker.pending

    def audio(self, pcm: np.ndarray) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for frame in self.chunker.push(np.asarray(pcm, np.float32).reshape(-1)):
            out += self._frame(frame)
        return out

    def marker(self, marker_id: int) -> list[dict[str, Any]]:
        """Queue a marker: due once the audio before it (a partial frame counts whole) and the delay are fed."""
        due = self.t.frames + (1 if self.buffered else 0) + self.t.flush_frames
        self.markers.append((due, marker_id))
        return self._due_markers()

    def pad_to_markers(self) -> list[dict[str, Any]]:
        """Feed silence until every waiting marker is due (what the client would have sent)."""
        out: list[dict[str, Any]] = []
        while self.markers:
            out += self.audio(np.zeros(FRAME_SIZE - self.buffered, np.float32))
        return out

    def _frame(self, frame: np.ndarray) -> list[dict[str, Any]]:
        timer = self.t.timer
        previous_announced = timer.partial != "" and self._announced == timer.opened
        words = self.t.feed(frame)
        out: list[dict[str, Any]] = []
        if self.t.pause_probabilities is not None:
            out.append(asr.step(self.t.gen.step_index, list(self.t.pause_probabilities), self.buffered))
        for i, w in enumerate(words):
            if not (i == 0 and previous_announced):
                out.append(asr.word(w.text, w.start))
            out.append(asr.end_word(w.end))
        start, text = timer.open_start, timer.partial.strip()
        if start is not None and text and not timer.last_was_text and self._announced != timer.opened:
            out.append(asr.word(text, start))  # its text is complete: say it now
            self._announced = timer.opened
        return out + self._due_markers()

    def _due_markers(self) -> list[dict[str, Any]]:
        out = []
        while self.markers and self.markers[0][0] <= self.t.frames:
            out.append(asr.marker(self.markers.popleft()[1]))
        return out


class StreamingEncoder(FrameEncoder, Protocol):
    """Mimi as a stream needs it: frames in, and a reset between streams."""

    def reset(self) -> None: ...


class TranscriberSource(Protocol):
    """Where streams come from: the MLX thread their model work runs on, and a fresh transcript (made there)."""

    mlx: MlxThread

    def new_transcriber(self) -> Transcriber: ...


class EngineStt:
    """A text-only ConversationEngine's own model (local_web): a stream resets the engine and takes its transcript,
    so /api/chat and this route share one model, one Mimi and one MLX thread (one client at a time across both)."""

    def __init__(self, engine: Any) -> None:
        if not engine.text_only:
            raise MoshiError("/api/asr-streaming needs a speech-to-text model (text only); this one answers with audio")
        self.engine = engine
        self.mlx: MlxThread = engine.mlx

    def new_transcriber(self) -> Transcriber:
        self.engine.reset()
        return self.engine.transcriber


class SttModel:
    """What a stream is made of: one LmGen of a text-only LM (made once, reset per stream, extra heads on),
    the Mimi and the tokenizer. `new_transcriber` runs on `mlx`."""

    def __init__(
        self, lm: Lm, mimi: StreamingEncoder, tokenizer: PieceSource, mlx: MlxThread | None = None,
        kv_bits: int | None = None, context: int | None = None,
    ) -> None:
        self.lm, self.mimi, self.tokenizer = lm, mimi, tokenizer
        self.mlx = mlx or MlxThread(name="moshi-asr")
        self._kv_bits, self._context = kv_bits or DEFAULT_KV_BITS, context
        self._gen: LmGen | None = None

    def new_transcriber(self) -> Transcriber:
        if self._gen is None:
            self._gen = LmGen(self.lm, GREEDY, GREEDY, kv_bits=self._kv_bits, context=self._context,
                              extra_heads=True)
        else:
            self._gen.reset()
        self.mimi.reset()
        return Transcriber(self._gen, self.mimi, self.tokenizer)


class AsrServer:
    """Serves ``/api/asr-streaming``: one stream at a time on `model`."""

    def __init__(
        self, model: TranscriberSource, *, policy: HostPolicy | None = None, check_origin: bool = True,
        flush_idle_s: float = FLUSH_IDLE_S, idle_close_s: float = IDLE_CLOSE_S,
    ) -> None:
        self.model = model
        self.policy = policy or HostPolicy()
        self.check_origin = check_origin
        self.flush_idle_s = flush_idle_s
        self.idle_close_s = idle_close_s
        self.active: web.WebSocketResponse | None = None
        self._idle = asyncio.Event()  # no stream active (set when one ends)
        # Another route holding the same model (create_app links /api/chat's ChatServer here): busy too.
        self.also_busy: Callable[[], bool] = lambda: False
        self.streams = 0
        self.refused_busy = 0
        self.last_frames = 0  # input frames the last stream put through the model

    async def _wait_for_leaver(self) -> bool:
        """True if no stream is active, after waiting a while for one whose client has closed (as /api/chat does:
        a client that reconnects at once is not told busy by its own last stream)."""
        if self.active is not None and self.active.closed:
            try:
                await asyncio.wait_for(self._idle.wait(), LEAVER_WAIT_S)
            except asyncio.TimeoutError:
                pass
        return self.active is None

    async def _on_model(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self.model.mlx.submit(fn, *args))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if self.check_origin and not self.policy.origin_ok(origin, request.secure, request.host):
            return web.Response(status=403, text="cross-origin WebSocket connections are refused\n")
        # No heartbeat: its pong would wait behind the audio a fast client queued while the model works, and
        # aiohttp would drop a healthy stream (Kyutai's stt_from_file script sends seconds ahead). A client that
        # goes quiet is closed after idle_close_s instead.
        ws = web.WebSocketResponse(max_msg_size=2 * asr.MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        peer = request.remote or "?"
        if not await self._wait_for_leaver() or self.also_busy():
            self.refused_busy += 1
            log.info("%s: asr refused: busy", peer)
            await _send(ws, asr.error(BUSY))
            await ws.close(code=1013, message=b"busy")
            return ws
        self.active = ws
        self._idle.clear()
        self.streams += 1
        log.info("%s: asr stream %d starts", peer, self.streams)
        stream: AsrStream | None = None
        try:
            stream = await self._on_model(lambda: AsrStream(self.model.new_transcriber()))
            await _send(ws, asr.ready())
            await self._serve(ws, stream)
        except ConnectionError:  # the client left while we were answering
            pass
        except Exception as e:  # say why before closing, as the Rust server logs and drops the stream
            log.exception("%s: asr stream failed", peer)
            try:
                await _send(ws, asr.error(f"server error: {first_line(e)}"))
            except Exception:
                pass
        finally:
            self.last_frames = stream.t.frames if stream is not None else 0
            self.active = None
            self._idle.set()
            if not ws.closed:
                await ws.close()
            log.info("%s: asr stream %d ends after %d frames", peer, self.streams, self.last_frames)
        return ws

    async def _serve(self, ws: web.WebSocketResponse, stream: AsrStream) -> None:
        """A reader takes the client's messages as they come (so a close is seen at once, not after the audio
        queued before it); this loop answers them one by one on the model. Once the client has gone, what it
        queued is dropped (nobody is left to read the answers)."""
        inbox: asyncio.Queue[InItem] = asyncio.Queue(maxsize=MAX_QUEUED_MESSAGES)
        reader = asyncio.create_task(self._read(ws, inbox))
        try:
            while True:
                try:
                    item = await asyncio.wait_for(inbox.get(), self.flush_idle_s if stream.markers else None)
                except asyncio.TimeoutError:  # a marker waits and the client is quiet: feed its silence
                    await _send_all(ws, await self._on_model(stream.pad_to_markers))
                    continue
                if item is None:
                    return
                await _send_all(ws, await self._answer(stream, item))
        finally:
            reader.cancel()

    async def _read(self, ws: web.WebSocketResponse, inbox: "asyncio.Queue[InItem]") -> None:
        try:
            while True:
                try:
                    msg = await ws.receive(timeout=self.idle_close_s)
                except asyncio.TimeoutError:
                    log.info("asr: no message for %.0f s; closing", self.idle_close_s)
                    return
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    return
                if msg.type != WSMsgType.BINARY:
                    item: InItem = asr.AsrProtocolError("messages are binary MessagePack maps; got a text message")
                else:
                    try:
                        item = asr.unpack_in(msg.data)
                    except asr.AsrProtocolError as e:
                        item = e
                await inbox.put(item)
        finally:  # the client has gone (or went quiet): drop what it queued, wake the answering loop
            while not inbox.empty():
                inbox.get_nowait()
            inbox.put_nowait(None)

    async def _answer(self, stream: AsrStream, item: "asr.InMessage | asr.AsrProtocolError") -> list[dict[str, Any]]:
        if isinstance(item, asr.AsrProtocolError):
            return [asr.error(str(item))]
        if isinstance(item, asr.Audio):
            return await self._on_model(stream.audio, item.pcm)
        if isinstance(item, asr.Marker):
            return await self._on_model(stream.marker, item.id)
        if isinstance(item, asr.OggOpus):
            return [asr.error("OggOpus is not supported by this server; send Audio (24 kHz float PCM)")]
        return []  # Init: the batched server's own reset message


async def _send(ws: web.WebSocketResponse, msg: dict[str, Any]) -> None:
    if ws.closed:
        raise ConnectionError("the client has gone")
    await ws.send_bytes(asr.pack_out(msg))


async def _send_all(ws: web.WebSocketResponse, msgs: list[dict[str, Any]]) -> None:
    for msg in msgs:
        await _send(ws, msg)


ASR_SERVER = web.AppKey("asr_server", AsrServer)


def add_asr_route(app: web.Application, server: AsrServer) -> None:
    """Register ``/api/asr-streaming`` (for a text-only STT model)."""
    app.router.add_get(asr.ASR_PATH, server.handle)
    app[ASR_SERVER] = server
