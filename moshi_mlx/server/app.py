"""The web server: one conversation at a time, the UI's files, ``/api/chat`` and ``/api/info``.

:class:`ChatServer` owns the engine and admits one client at a time: a second one gets an error
(``busy``) and is closed; the engine is reset for every conversation (off the event loop, in one
worker thread). :func:`create_app` builds the aiohttp application around it: the UI from ``web/``
(only its own files), the WebSocket at ``/api/chat`` (:class:`ChatSocket`, one
:class:`~moshi_mlx.server.session.Conversation` per client) and ``/api/info`` (JSON), behind the
Host/Origin policy of :mod:`moshi_mlx.server.security`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from ..audio.frames import SAMPLE_RATE
from ..conditioning import ConditioningError, check_conditioning, conditioner_values, default_condition, model_kind
from ..engine import ConversationEngine
from ..errors import MoshiError, first_line
from ..model_files.personaplex import MODEL_TYPE as PERSONA_MODEL_TYPE
from ..models.config import LmConfig
from ..net import protocol
from ..net.protocol import ParamError
from ..settings import EngineSettings, in_effect
from ..voices import list_voices
from .asr import AsrServer, add_asr_route
from .info import knobs_info
from .security import (
    FOREIGN_UI,
    HostPolicy,
    QuietHttpErrors,
    add_security_headers,
    hide_server_version,
    host_guard,
    parse_origin,
    ui_file,
)
from .session import Conversation

log = logging.getLogger("moshi_mlx.web.app")

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the moshi_mlx package
#: An HTTP connection with no complete request for this long is closed (aiohttp's keep-alive timer, which also
#: runs before the first request; its default of an hour let unfinished requests hold sockets, slowloris-style).
IDLE_CONNECTION_S = 10.0


class WebUiMissing(MoshiError, RuntimeError):
    """No index.html where the UI should be (a broken install, or a wrong --web-dir)."""


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


def model_fields(config: LmConfig) -> dict[str, Any]:
    """`model_kind` ("translation model" for Hibiki) and `conditioning`: the conditioner's values and default,
    or None for a model without conditioners (the web UI then shows no guidance or condition fields)."""
    table = conditioner_values(config)
    conditioning = None
    if len(table) == 1:
        (name, values), = table.items()
        conditioning = {"conditioner": name, "values": list(values), "default": default_condition(config)}
    # text_only: a speech-to-text model (live captions, no audio out): the web UI shows captions instead
    return {"model_kind": model_kind(config), "conditioning": conditioning, "text_only": config.text_only}


#: The query parameter of each persona choice (for the one line that refuses them).
_PERSONA_NAMES = {"text_prompt": "text_prompt", "voice": "voice_prompt"}


def is_persona_model(engine: ConversationEngine, defaults: EngineSettings) -> bool:
    """A model that takes a role prompt and a voice: PersonaPlex, one given voice presets, or one the command line
    already gave a prompt or a voice."""
    config = engine.lm.config
    return config.model_type == PERSONA_MODEL_TYPE or engine.voices_dir is not None or defaults.has_prompt


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
        stt: Any = None,
    ) -> None:
        self.engine = engine
        # --transcribe-user: an STT model (SttAssets) writing down the user's words for clients asking for them
        self.stt = stt
        self.lm_model_file = lm_model_file
        # What kind of model this is and, for a conditioned one, the conditions the UI offers.
        self.model_fields = model_fields(engine.lm.config)
        # Settings for parameters a client leaves out (the command line's, by default), as the model runs them
        # (a text-only model: greedy, whatever the flags said; see settings.in_effect).
        self.text_only = engine.text_only
        self.default_settings: EngineSettings = in_effect(default_settings or engine.settings, self.text_only)
        # A persona model (PersonaPlex): the role prompt and voice a client may choose, else None.
        self.persona = is_persona_model(engine, self.default_settings)
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
        # Another route holding the same model (create_app links /api/asr-streaming here): busy too.
        self.also_busy: Callable[[], bool] = lambda: False
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
                "busy": self.active is not None or self.also_busy(),
                "conversations": self.conversations,
                "threads": threading.active_count(),
                "protocol": {"sample_rate": SAMPLE_RATE, "params": list(protocol.KNOWN_PARAMS)},
                "defaults": protocol.QueryResult(self.default_settings).describe(),
                "knobs": knobs_info(self.text_only),  # the UI offers these, with these limits: one set of bounds
                **self.model_fields,  # model_kind; conditioning (null: the UI hides guidance and condition)
                "persona": self.persona_info(),  # null: the UI hides the role prompt and the voice picker
            }
        )
        origin = request.headers.get("Origin")
        if origin and _parsed(origin) in self.policy.origins:  # a client hosted on an --allow-origin
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    def persona_info(self) -> dict[str, Any] | None:
        """The voices a client may name (read from the folder each time: presets added later show) and the
        server's own prompt and voice, for a persona model; None for any other."""
        if not self.persona:
            return None
        d = self.default_settings
        voice = Path(d.voice).stem if d.voice else None  # a recording's name, not where it lies on the server
        return {"voices": list_voices(self.engine.voices_dir), "voice": voice, "text_prompt": d.text_prompt}

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
            query = protocol.parse_query(request.query, self.default_settings, self.text_only)
            given = query.applied
            check_conditioning(self.engine.lm.config, given.get("condition"), given.get("cfg_coef"))
            if query.persona and not self.persona:
                raise ParamError(f"{' and '.join(_PERSONA_NAMES[k] for k in query.persona)}: this model takes no "
                                 "role prompt or voice (a PersonaPlex model does)")
            voice = query.persona.get("voice")
            if voice is not None:  # said here in the client's terms: the names it may use, not the server's folder
                voices = list_voices(self.engine.voices_dir)
                if voice not in voices:
                    raise ParamError(f"unknown voice {voice!r}; this server has {', '.join(voices) or 'no presets'}")
        except (ParamError, ConditioningError) as e:
            log.info("%s: refused: %s", peer, e)
            return await self._refuse(ws, f"bad parameter: {e}", 1008)
        if query.ignored:  # said back in the info message's ignored_params too
            why = "; ".join(sorted(set(query.ignored.values())))
            log.info("%s: ignored %s: %s", peer, ", ".join(query.ignored), why)
        if not await self._wait_for_leaver():
            self.refused_busy += 1
            log.info("%s: refused: busy", peer)
            return await self._refuse(ws, "busy: another conversation is in progress; try again later", 1013)
        await self._converse(Conversation(self, ws, query, peer))
        return ws

    async def _wait_for_leaver(self) -> bool:
        """True if no conversation is active, after waiting a while for one already leaving to clean up."""
        active = self.active
        if active is not None and (active.closing or active.ws.closed):
            try:  # the previous client is leaving: wait for its cleanup rather than say busy
                await asyncio.wait_for(self.idle_event().wait(), 15.0)
            except asyncio.TimeoutError:
                pass
        return self.active is None and not self.also_busy()

    async def _converse(self, conv: Conversation) -> None:
        """Reset the engine for ``conv``, serve it, then release the engine (even if the handler is cancelled)."""
        self.active = conv
        self.idle_event().clear()
        self.conversations += 1
        loop = asyncio.get_running_loop()
        log.info("%s: conversation %d starts (%s)", conv.peer, self.conversations, conv.query.describe())
        try:
            try:
                await loop.run_in_executor(self.executor, self.engine.reset, conv.query.settings)
            except MoshiError as e:  # what the model refuses of this client's choice: an unknown voice, a
                # prompt longer than the context, a voice file that is not audio. The engine keeps its settings.
                log.info("%s: refused: %s", conv.peer, first_line(e))
                await _say_and_close(conv.ws, f"bad parameter: {first_line(e)}", code=1008)
                return
            await conv.run()
        except ConnectionError:  # the client left while we were talking to it
            pass
        except Exception as e:
            log.exception("%s: conversation failed", conv.peer)
            conv.failure = conv.failure or f"server error: {first_line(e)}"
            await _say_and_close(conv.ws, conv.failure)
        finally:
            conv.closing = True
            runner = conv.runner
            stop_future = loop.run_in_executor(self.executor, runner.stop, 30.0) if runner else None
            if stop_future is None:
                self._release(conv)
            else:
                stop_future.add_done_callback(lambda _: self._release(conv))
            await asyncio.shield(self._finish(conv, stop_future))

    def _release(self, conv: Conversation) -> None:
        """The engine is free again (its runner has stopped): admit the next client."""
        if self.active is conv:
            self.active = None
            self.idle_event().set()
        st = conv.runner.stats if conv.runner else None
        log.info(
            "%s: conversation ends after %.1f s: %d frames in, %d answered, %d skipped, %d audio dropped",
            conv.peer, time.monotonic() - conv.started, st.frames_in if st else 0,
            st.frames_out if st else 0, st.dropped if st else 0, conv.dropped_out,
        )

    async def _finish(self, conv: Conversation, stop_future: "asyncio.Future | None") -> None:
        await conv.stop_io()
        if stop_future is not None:
            await stop_future


async def _say_and_close(ws: web.WebSocketResponse, message: str, code: int = 1011) -> None:
    """Send an error directly (the sender task may not be running yet), then close (a server error by default;
    1008: the client's parameters)."""
    try:
        await asyncio.wait_for(ws.send_bytes(protocol.encode_error(message)), 2.0)
        reason = b"server error" if code == 1011 else b"bad parameter"
        await asyncio.wait_for(ws.close(code=code, message=reason), 2.0)
    except Exception:
        pass


CHAT_SERVER = web.AppKey("chat_server", ChatServer)
WEB_DIR = web.AppKey("web_dir", Path)


def create_app(
    server: ChatServer, web_dir: str | os.PathLike | None = None, asr: AsrServer | None = None,
) -> web.Application:
    """The aiohttp application: UI files, ``/api/chat`` (WebSocket) and ``/api/info`` (JSON); with `asr` (a
    text-only STT model), Kyutai's ``/api/asr-streaming`` too."""
    root = find_web_dir(web_dir)
    index = root / "index.html"
    hide_server_version()
    app = web.Application(
        middlewares=[host_guard(server.policy)],
        handler_args={
            "logger": QuietHttpErrors(logging.getLogger("aiohttp.server"), {}), "keepalive_timeout": IDLE_CONNECTION_S,
        },
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
        stream = asr.active if asr is not None else None
        if stream is not None and not stream.closed:
            try:
                await asyncio.wait_for(stream.close(code=1001, message=b"server shutting down"), 2.0)
            except Exception:
                pass

    app.on_response_prepare.append(no_cache)
    app.on_response_prepare.append(add_security_headers)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get(protocol.CHAT_PATH, server.handle_chat)
    app.router.add_get(protocol.INFO_PATH, server.handle_info)
    if asr is not None:  # one model behind both routes: one client at a time across them
        add_asr_route(app, asr)
        server.also_busy = lambda: asr.active is not None
        asr.also_busy = lambda: server.active is not None
    app.router.add_get("/", handle_index)
    app.router.add_get("/{path:.+}", handle_file)  # only the UI's files (web_security.ui_file)
    app[CHAT_SERVER] = server
    app[WEB_DIR] = root
    return app
