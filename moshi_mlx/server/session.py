"""One client's conversation: Kyutai's WebSocket protocol in and out around the engine's runner.

The client streams Ogg/Opus pages of its microphone; :class:`~moshi_mlx.net.opus.OpusFrames` turns
them into 80 ms frames pushed into an :class:`~moshi_mlx.engine.EngineRunner` (which skips the oldest
when the model falls behind). Moshi's answers come back on the engine's decode thread and are
encoded there; they reach the client through a bounded :class:`OutQueue`, so a client that stops
reading loses Moshi's audio instead of making the server buffer it without end.

A speech-to-text model (live captions) sends no audio: its text pieces go out as Kyutai's 0x02 text, as Moshi's
do, and each answered frame adds one 0x04 metadata message of ``type: "captions"`` (:func:`captions_message`)
with the words the frame completed (times in seconds of the client's audio), the end-of-turn probability and
whether an end of turn was detected. Kyutai's client reads metadata as server info and ignores fields it does not
know, so it keeps working (it shows the text).

Admission (one conversation at a time), the engine's reset and the HTTP side live in
:mod:`moshi_mlx.server.app`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from statistics import median
from typing import Any, Callable, Protocol

from aiohttp import WSMsgType, web

from ..audio.frames import FRAME_SIZE, SAMPLE_RATE
from ..engine import ConversationEngine, EngineRunner, FrameResult
from ..errors import first_line
from ..net import protocol
from ..net.opus import OpusDecodeError, OpusFrames
from ..net.protocol import Kind, ProtocolError
from .info import server_info

log = logging.getLogger("moshi_mlx.web.session")


def captions_message(result: FrameResult) -> dict[str, Any]:
    """Our metadata fields for one frame of a text-only model (the server's info fields are added by the caller).

    ``words``: ``[{"text", "start", "end"}]`` completed at this frame (seconds from the start of the client's
    audio); ``end_of_turn``: head 2's probability that the speaker has finished (None: no VAD heads);
    ``pauses``: every head's; ``turn_end``: true on the frame where an end of turn was detected."""
    return {
        "type": "captions",
        "frame": result.frame,
        "words": [{"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3)} for w in result.words],
        "end_of_turn": None if result.end_of_turn is None else round(result.end_of_turn, 4),
        "pauses": None if result.pauses is None else [round(p, 4) for p in result.pauses],
        "turn_end": result.turn_end,
    }


def _persona(settings: Any) -> dict[str, Any] | None:
    """The role prompt and voice this conversation started with (None: no system prompt)."""
    if not settings.has_prompt:
        return None
    voice = Path(settings.voice).stem if settings.voice else None  # a name, not a path on the server
    return {"text_prompt": settings.text_prompt, "voice": voice}


class Host(Protocol):
    """What a conversation needs of the server that admitted it (:class:`~moshi_mlx.server.app.ChatServer`)."""

    engine: ConversationEngine
    description: str
    model_fields: dict[str, Any]  # model_kind, conditioning (see server.app.model_fields)
    demo: bool
    lm_model_file: str
    max_pending: int
    max_audio_backlog: int
    max_message_bytes: int
    stats_interval: float
    stt: Any  # the user's speech-to-text model (moshi_mlx.model_files.assets.SttAssets), or None


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


class Conversation:
    """One client's session: protocol in and out around the shared engine's runner."""

    def __init__(self, server: Host, ws: web.WebSocketResponse, query: protocol.QueryResult, peer: str) -> None:
        self.server = server
        self.ws = ws
        self.query = query
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.out = OutQueue(max_audio=server.max_audio_backlog)
        self.opus = OpusFrames()  # decoded on the event loop, encoded on the engine's decode thread
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
        self.user_words = 0  # the user's words sent (0x08, --transcribe-user and a client that asked)
        self.user_stt = None  # a UserTranscriber for this conversation, when both want one
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
        if result.pcm is None:  # a text-only model: captions, no audio
            self._call(self._deliver_captions, result.text, captions_message(result))
            return
        page = b""
        if not self.out.audio_full():
            try:
                page = self.opus.encode(result.pcm)
            except Exception as e:  # never let the codec kill the engine thread
                self._call(self._send_error, f"could not encode Moshi's audio: {first_line(e)}", "encode")
        else:
            self.not_encoded += 1  # skipped before encoding: the Ogg stream stays continuous
        self._call(self._deliver, page, result.text)

    def on_error(self, error: BaseException) -> None:
        self._call(self._fail, f"the model failed: {first_line(error)}")

    def on_user_words(self, words: list) -> None:
        """The user's words, on the STT model's worker thread: handed to the event loop."""
        self._call(self._deliver_user_words, words)

    # -- event loop side -------------------------------------------------------------------
    def _deliver_user_words(self, words: list) -> None:
        if not self.closing:
            self.user_words += len(words)
            self.out.put(protocol.encode_user_words(words))

    def _deliver(self, page: bytes, text: str | None) -> None:
        if self.closing:
            return
        if page:
            if self.out.put(protocol.encode_audio(page), audio=True):
                self.audio_frames_out += 1
        if text:
            self.text_pieces += 1
            self.out.put(protocol.encode_text(text))

    def _deliver_captions(self, text: str | None, fields: dict[str, Any]) -> None:
        if self.closing:
            return
        if text:
            self.text_pieces += 1
            self.out.put(protocol.encode_text(text))
        self.out.put(protocol.encode_metadata({**self.server_fields, **fields}))

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
            **self.server.model_fields,
            "demo": self.server.demo,
            "sample_rate": SAMPLE_RATE,
            "frame_size": FRAME_SIZE,
            "settings": self.query.describe(),
            "persona": _persona(self.query.settings),
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
            frames = self.opus.decode(payload)
        except OpusDecodeError as e:
            self.bad_audio += 1
            self._send_error(f"could not decode audio ({e}); the Opus decoder was reset", key="audio")
            return
        if self.runner is None:
            return
        for frame in frames:
            self.frames_pushed += 1
            self.runner.push(frame)
            if self.user_stt is not None:  # queues a copy for the STT model's thread; never waits
                self.user_stt.push(frame)

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
        stt = getattr(self.server, "stt", None)
        if stt is not None and self.query.user_words:  # only a client that shows them asked for them
            from ..user_transcript import UserTranscriber

            self.user_stt = UserTranscriber(
                stt.lm, stt.mimi, stt.tokenizer, self.on_user_words,
                on_error=lambda e: self._call(self._send_error, f"your words cannot be written down: {first_line(e)}",
                                              "stt"),
            )
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
        if self.user_stt is not None:  # its thread stops (the last step finishing) off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.user_stt.close, False)
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
