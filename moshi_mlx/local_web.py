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

This module is the command (flags, checks before the model loads, wiring); the server is in
:mod:`moshi_mlx.server`: ``session`` (one client), ``app`` (admission, routes, UI files) and
``startup`` (port probe, ``--ssl``, the serve loop).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from . import cli
from .errors import UsageError
from .model_files.assets import STT_DEMO
from .net.protocol import DEFAULT_PORT
from .server.app import ChatServer, create_app, find_web_dir
from .net.asr_protocol import ASR_PATH
from .server.asr import AsrServer, EngineStt
from .server.security import HostPolicy, parse_origin
from .server.startup import check_port_free, serve, ssl_setup

log = logging.getLogger("moshi_mlx.web")

DEFAULT_HOST = "localhost"


def build_parser() -> argparse.ArgumentParser:
    from .cli.flags import add_engine_args, add_lag_arg, add_stt_demo_arg, add_transcribe_user_arg

    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.local_web",
        description="Talk to Moshi in your browser: serves the web UI and Kyutai's WebSocket protocol locally.",
    )
    add_engine_args(p, persona=True)  # a persona model's prompt and voice: the defaults of every connection
    add_stt_demo_arg(p)
    add_transcribe_user_arg(p)
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


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    from .cli.flags import check_persona_args, load_from_args, load_user_stt, resolve_user_stt, settings_from_args

    server: ChatServer | None = None
    try:
        check_persona_args(args)  # a prompt file or voice path that cannot be read: one line, nothing loaded
        web_dir = find_web_dir(args.web_dir)  # fail before the (slow) model load
        want_stt, stt_resolved = resolve_user_stt(args)  # a bad REPO: one line, nothing loaded
        if want_stt and args.demo == STT_DEMO:
            raise UsageError("--transcribe-user: --demo-stt already writes your words down")
        ssl_ctx, announce = ssl_setup(args.ssl, args.host)
        check_port_free(args.host, args.port)
        t0 = time.perf_counter()
        stt = load_user_stt(args, stt_resolved) if want_stt else None
        assets = load_from_args(args, stt=stt)
        engine = assets.engine(settings_from_args(args, assets.lm.config))
        if stt is not None and engine.text_only:
            raise UsageError("--transcribe-user: this model is a speech-to-text model; it already writes your words down")
        load_s = time.perf_counter() - t0
        warm_s = engine.warmup()
        log.info("ready in %.1f s (load %.1f s, warm-up %.1f s): %s", load_s + warm_s, load_s, warm_s, assets.description)
        server = ChatServer(
            engine, description=assets.description, demo=assets.demo, max_pending=args.max_lag_frames,
            lm_model_file=assets.lm_file,
            policy=HostPolicy(args.host, args.allow_origin), stt=stt,
        )
        # A speech-to-text model also answers Kyutai's STT WebSocket (what Unmute's STT client speaks).
        asr = AsrServer(EngineStt(engine), policy=server.policy) if engine.text_only else None
        app = create_app(server, web_dir, asr=asr)
        if asr is not None:
            log.info("speech to text: Kyutai's STT WebSocket (Unmute's) at %s too", ASR_PATH)
        asyncio.run(serve(app, args.host, args.port, ssl_ctx, not args.no_browser, announce))
        return 0
    finally:
        if server is not None:
            server.close()


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
