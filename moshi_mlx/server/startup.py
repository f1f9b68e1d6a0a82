"""Before and while serving: is the port free, ``--ssl`` (auto or a folder), the URL to open, the serve loop.

The checks run before the (slow) model load, so a busy port or a missing certificate is said in one
line (a :class:`~moshi_mlx.errors.MoshiError`) within a second instead of after a minute of loading.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import ssl
import threading
import webbrowser
from pathlib import Path
from typing import Callable

from aiohttp import web

from ..errors import MoshiError
from ..net import tls

log = logging.getLogger("moshi_mlx.web.startup")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_HOST = ("", "0.0.0.0", "::")

#: What to tell the user once the port is known (the LAN addresses of an --ssl auto server).
Announce = Callable[[int], None]


class CannotListen(MoshiError, OSError):
    """The address cannot be bound: another server holds the port, or the host name is wrong."""


def _cannot_listen(host: str, port: int, why: object, hint: bool = True) -> CannotListen:
    tail = " (is another server running? try --port)" if hint else ""
    return CannotListen(f"cannot listen on {host}:{port}: {why}{tail}")


# ------------------------------------------------------------------------------------------------
# Checks before loading
# ------------------------------------------------------------------------------------------------


def check_port_free(host: str, port: int) -> None:
    """Fail before the (slow) model load if the address cannot be bound."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise _cannot_listen(host, port, e.strerror or e, hint=False) from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            if os.name != "nt":  # as aiohttp binds: a port in TIME_WAIT is free
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                # No IPv6 here (aiohttp skips it too); by name: the numbers differ (Linux 97/99, macOS 47/49)
                if family == socket.AF_INET6 and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    continue
                raise _cannot_listen(host, port, e.strerror or e) from None


def ssl_setup(option: str | None, host: str) -> tuple[ssl.SSLContext | None, Announce | None]:
    """--ssl auto|DIR: the server's SSL context, and what to tell the user once the port is known."""
    if not option:  # plain http: on the LAN, the page loads but its browser refuses the microphone
        if host in LOOPBACK_HOSTS:
            return None, None
        return None, lambda port: announce_lan(host, port, tuple(tls.machine_addresses()), secure=False)
    if option != "auto":
        return folder_context(option), None
    info = tls.ensure_certificate()
    ctx = tls.server_context(info.cert, info.key)
    made = "made a new" if info.created else "using the"
    log.info("%s self-signed certificate %s", made, info.cert)
    log.info("certificate SHA-256 fingerprint: %s", info.fingerprint)
    return ctx, lambda port: announce_lan(host, port, info.addresses)


def folder_context(directory: str | os.PathLike) -> ssl.SSLContext:
    """--ssl DIR: DIR/cert.pem and DIR/key.pem, or a one-line error saying how to make them."""
    d = Path(directory)
    cert, key = d / tls.CERT_FILE, d / tls.KEY_FILE
    for f in (cert, key):
        if not f.is_file():
            raise tls.TlsError(
                f"--ssl {d}: {f} not found; create a self-signed pair with: openssl req -x509 -newkey rsa:2048 "
                f"-nodes -days 365 -subj /CN=localhost -keyout {key} -out {cert}"
            )
    try:
        return tls.server_context(cert, key)
    except tls.TlsError as e:
        raise tls.TlsError(f"--ssl {d}: {e}") from None


def announce_lan(host: str, port: int, addresses: tuple[str, ...], secure: bool = True) -> None:
    """Where other devices reach the server (or why they cannot); over plain http, that their browsers will
    refuse the microphone."""
    if host in LOOPBACK_HOSTS:
        log.info("other devices cannot reach %s; add --host 0.0.0.0 to serve the LAN", host)
        return
    lan = [a for a in addresses if not a.startswith("127.") and a != "::1"]
    if host == "0.0.0.0":  # IPv4 only
        lan = [a for a in lan if ":" not in a]
    if not secure:
        log.info("other devices' browsers allow the microphone only over https: restart with --ssl auto to talk "
                 "from them")
    for addr in lan if host in ANY_HOST else [host]:
        if secure:
            log.info("from another device: %s  (accept the certificate warning after checking the fingerprint)",
                     browser_url(addr, port, True))
        else:
            log.info("from another device: %s  (the page only, no microphone)", browser_url(addr, port, False))


def browser_url(host: str, port: int, secure: bool) -> str:
    shown = "localhost" if host in (*ANY_HOST, "localhost") else host
    if ":" in shown and not shown.startswith("["):  # an IPv6 literal
        shown = f"[{shown}]"
    return f"{'https' if secure else 'http'}://{shown}:{port}/"


# ------------------------------------------------------------------------------------------------
# Serving
# ------------------------------------------------------------------------------------------------


async def serve(
    app: web.Application, host: str, port: int, ssl_ctx: ssl.SSLContext | None, open_browser: bool,
    announce: Announce | None = None,
) -> None:
    """Serve ``app`` until SIGTERM or Ctrl-C (KeyboardInterrupt), then shut it down cleanly."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        port = await _start(runner, host, port, ssl_ctx)
    except BaseException:
        await runner.cleanup()
        raise
    try:
        url = browser_url(host, port, ssl_ctx is not None)
        log.info("open %s in your browser (Ctrl-C to quit)", url)
        if announce is not None:
            announce(port)
        if open_browser:  # webbrowser may block for a while: not on the event loop
            threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
        await _until_terminated()
    finally:  # Ctrl-C arrives here as a cancellation
        await runner.cleanup()
        log.info("server stopped")


async def _start(runner: web.AppRunner, host: str, port: int, ssl_ctx: ssl.SSLContext | None) -> int:
    """Start listening; the port actually bound (an ephemeral one for port 0)."""
    site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx)
    try:
        await site.start()
    except OSError as e:  # the port was taken between check_port_free and now
        raise _cannot_listen(host, port, e.strerror or e) from None
    if port == 0:
        sockets = getattr(site._server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else port
    return port


async def _until_terminated() -> None:
    stop = asyncio.Event()
    try:  # a clean shutdown on `kill`, like Ctrl-C
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        pass
    await stop.wait()
