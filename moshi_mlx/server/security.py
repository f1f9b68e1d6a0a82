"""What the local web server lets in and sends out: Host and Origin rules, headers, served files.

* **Host allow-list** (:class:`HostPolicy`): a DNS-rebinding page reaches a local server under the
  attacker's own name (``Host: evil.example:8998``), so only loopback names and addresses, the
  ``--host`` value and the hosts of ``--allow-origin`` origins are served; anything else gets 403
  before any handler runs. When listening on every interface (``--host 0.0.0.0``), IP addresses and
  this machine's name are accepted too: an address cannot be rebound.
* **Origin check** for the WebSocket: scheme, host and port must be the page's own (same origin),
  or one of the ``--allow-origin`` origins. Clients that send no Origin (not browsers) are let in.
* **Headers** on every response (:func:`add_security_headers`): a Content-Security-Policy that
  allows only this server's scripts, workers (blob: too, which the vendored Opus decoder uses) and
  WebAssembly; ``nosniff``; no framing; and a ``Server`` header without versions. When the server
  serves a UI other than ours (``--web-dir``), a worker script (``Sec-Fetch-Dest: worker``) alone may also
  use ``eval``: it has no DOM to inject into, and the Opus decoder worker of Kyutai's built client finds
  its global object with ``new Function``. Our own UI never gets it.
* **Served files** (:func:`ui_file`): only what a web UI is made of, never package metadata,
  READMEs, build scripts or dot files.
"""

from __future__ import annotations

import ipaddress
import logging
import mimetypes
import socket
from pathlib import Path, PurePosixPath
from typing import Iterable
from urllib.parse import urlsplit

from aiohttp import web, web_response
from aiohttp.http_exceptions import HttpProcessingError

from ..net.tls import is_ip

SERVER_NAME = "moshi_mlx"
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}

# With nosniff, browsers only run workers/wasm served with the right types.
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("application/wasm", ".wasm")


def _host_name(host: str) -> str | None:
    """``name:port`` / ``[v6]:port`` / ``name`` -> the lower-case name without brackets, or None."""
    try:
        parts = urlsplit("//" + host)
        parts.port  # noqa: B018 - raises ValueError on a bad port
        return parts.hostname
    except ValueError:
        return None


def parse_origin(origin: str) -> tuple[str, str, int]:
    """``scheme://host[:port]`` -> (scheme, host, port); ValueError for anything else."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{origin!r} is not an origin like http://localhost:5173") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{origin!r} is not an origin like http://localhost:5173 (scheme, host and port only)")
    return scheme, parts.hostname, port or DEFAULT_PORTS[scheme]


class HostPolicy:
    """Which Host headers and WebSocket Origins the server accepts."""

    def __init__(self, bind_host: str = "localhost", allow_origins: Iterable[str] = ()) -> None:
        self.origins = {parse_origin(o) for o in allow_origins}
        bind = (bind_host or "").strip("[]").lower()
        self.any_interface = bind in WILDCARD_HOSTS
        self.names = {"localhost"} | {host for _, host, _ in self.origins}
        if not self.any_interface:
            self.names.add(bind)
        else:
            machine = socket.gethostname().lower()
            self.names |= {machine, machine + ".local"}

    def host_ok(self, host: str | None) -> bool:
        if host is None:  # HTTP/1.0 without Host: not a browser, so not a rebinding page
            return True
        name = _host_name(host)
        if not name:
            return False
        if name in self.names or name.endswith(".localhost"):  # *.localhost never leaves the machine
            return True
        if is_ip(name):
            return self.any_interface or ipaddress.ip_address(name).is_loopback
        return False

    def origin_ok(self, origin: str | None, secure: bool, host: str) -> bool:
        """Same origin as the page (scheme, host and port), or an allowed one; no Origin is fine."""
        if origin is None:
            return True
        try:
            theirs = parse_origin(origin)
        except ValueError:  # "null" (sandboxed frames, file://) and garbage
            return False
        if theirs in self.origins:
            return True
        scheme = "https" if secure else "http"
        try:
            parts = urlsplit("//" + host)
            ours = (scheme, parts.hostname, parts.port or DEFAULT_PORTS[scheme])
        except ValueError:
            return False
        return theirs == ours


WORKER_DESTINATIONS = ("worker", "sharedworker")
#: Set on the app when it serves a UI other than ours (`--web-dir`, e.g. Kyutai's built client).
FOREIGN_UI = web.AppKey("foreign_ui", bool)


def content_security_policy(host: str, worker: bool = False) -> str:
    """The policy for a response; ``worker``: the response is a worker's script (its own policy)."""
    # The Opus codecs are WebAssembly. A worker gets the policy sent with its own script, and the
    # webpack runtime in Kyutai's decoder worker breaks without eval (``new Function("return this")``).
    scripts = "script-src 'self' 'wasm-unsafe-eval'" + (" 'unsafe-eval'" if worker else "")
    # The page's own WebSocket is named explicitly: older Safari does not let 'self' cover ws(s):.
    return "; ".join(
        [
            "default-src 'self'",
            scripts,
            "worker-src 'self' blob:",  # ogg-opus-decoder starts its worker from a blob: URL
            f"connect-src 'self' ws://{host} wss://{host}",
            "img-src 'self' data: blob:",
            "media-src 'self' blob:",
            "style-src 'self' 'unsafe-inline'",  # style attributes only; no script can come from them
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` hook: the same headers on every response (eval only for workers)."""
    h = response.headers
    h["Server"] = SERVER_NAME
    # Our own UI never needs eval; a foreign one's decoder worker may (see content_security_policy).
    worker = request.app.get(FOREIGN_UI, False) and request.headers.get("Sec-Fetch-Dest", "").lower() in WORKER_DESTINATIONS
    h["Content-Security-Policy"] = content_security_policy(request.host, worker)
    h["X-Content-Type-Options"] = "nosniff"
    h["X-Frame-Options"] = "DENY"
    h["Referrer-Policy"] = "no-referrer"
    h["Cross-Origin-Opener-Policy"] = "same-origin"


def hide_server_version() -> None:
    """Responses aiohttp makes itself (400 for a malformed request) name no versions either.

    They never reach the application's hooks, so the default ``Server`` value is replaced; this
    process serves only this application.
    """
    if hasattr(web_response, "SERVER_SOFTWARE"):
        web_response.SERVER_SOFTWARE = SERVER_NAME


class QuietHttpErrors(logging.LoggerAdapter):
    """aiohttp's server logger, with malformed requests logged as one line instead of a traceback.

    Pass as ``web.Application(handler_args={"logger": QuietHttpErrors(...)})``. Errors of the
    application itself keep their traceback.
    """

    def log(self, level: int, msg: object, *args: object, exc_info: object = None, **kwargs: object) -> None:
        if isinstance(exc_info, HttpProcessingError):
            peer = args[0] if args else "?"
            reason = " ".join(str(exc_info.message or type(exc_info).__name__).split())[:200]
            self.logger.info("bad HTTP request from %s: %s (%s)", peer, reason, exc_info.code)
            return
        self.logger.log(level, msg, *args, exc_info=exc_info, **kwargs)


def host_guard(policy: HostPolicy):
    """Middleware: 403 for a Host that is not on the allow-list, before any handler."""

    @web.middleware
    async def guard(request: web.Request, handler):
        if not policy.host_ok(request.headers.get("Host")):
            return web.Response(status=403, text="this server answers only to localhost (see --allow-origin)\n")
        return await handler(request)

    return guard


# ------------------------------------------------------------------------------------------------
# Which files are served
# ------------------------------------------------------------------------------------------------

# The UI's own files at the top level (index.html, app.js, style.css, favicons, ...).
TOP_LEVEL = {".html", ".js", ".css", ".ico", ".svg", ".png"}
# A bundler's output folder (Kyutai's built client keeps everything under assets/).
ASSET_SUFFIXES = TOP_LEVEL | {".jpg", ".jpeg", ".webp", ".gif", ".wasm", ".woff", ".woff2", ".ttf", ".json"}


def ui_file(root: Path, rel: str) -> Path | None:
    """The file under ``root`` for URL path ``rel``, if it is part of a UI; None otherwise.

    Served: top-level ``*.html *.js *.css *.ico *.svg *.png``, ``vendor/*.js``,
    ``vendor/LICENSES/*`` and anything web-like under ``assets/``. Never dot files, READMEs,
    ``package*.json`` or ``scripts/``; never a path that leaves ``root``.
    """
    parts = PurePosixPath(rel).parts
    if not parts or any(p in (".", "..") or p.startswith(".") or "\\" in p for p in parts):
        return None
    suffix = PurePosixPath(parts[-1]).suffix.lower()
    allowed = (
        (len(parts) == 1 and suffix in TOP_LEVEL)
        or (len(parts) == 2 and parts[0] == "vendor" and suffix == ".js")
        or (len(parts) == 3 and parts[:2] == ("vendor", "LICENSES"))
        or (len(parts) >= 2 and parts[0] == "assets" and suffix in ASSET_SUFFIXES)
    )
    if not allowed:
        return None
    path = root.joinpath(*parts)
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_file() or not real.is_relative_to(root.resolve()):
        return None
    return real
