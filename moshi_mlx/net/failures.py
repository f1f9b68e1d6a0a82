"""What goes wrong talking to a Moshi server, each as a :class:`ClientError` with one line for the user.

:func:`connect_failure` turns aiohttp's exceptions on connecting into those lines (TLS, DNS, refused,
HTTP refusals, timeouts); the helpers below word the rest (close codes, a server's 0x05 messages).
:mod:`moshi_mlx.net.remote` raises them.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
from yarl import URL

from ..errors import MoshiError, UsageError, first_line
from . import protocol
from .protocol import ProtocolError


class ClientError(MoshiError, RuntimeError):
    """A failure meant for the user, in one line."""


class BadUrl(ClientError, UsageError):
    pass


class ServerUnreachable(ClientError):
    pass


class ServerRefused(ClientError):
    pass


class ProtocolFailure(ClientError):
    pass


class ConnectionLost(ClientError):
    pass


def where(url: URL) -> str:
    """``host:port`` as the user typed it (no port if none was given)."""
    return f"{url.host}:{url.port}" if url.port else str(url.host)


def connect_failure(e: BaseException, url: URL, connect_timeout: float) -> ClientError | None:
    """The user's line for an exception raised by ``ws_connect`` (None: not a connection failure)."""
    at = where(url)
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        why = getattr(e.certificate_error, "verify_message", None) or first_line(e.certificate_error)
        return ServerRefused(
            f"TLS: the certificate of {at} is not trusted ({why}); for your own server started with "
            "--ssl auto, check its fingerprint and pass --insecure, or --cafile with its cert.pem"
        )
    if isinstance(e, aiohttp.ClientConnectorSSLError):
        return ServerRefused(f"TLS handshake with {at} failed ({_ssl_reason(e)}){_plain_hint(e)}")
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return ServerUnreachable(f"cannot reach {at}: unknown host name {url.host!r}")
    if isinstance(e, aiohttp.ClientConnectorError):
        errno = getattr(e.os_error, "errno", None)  # asyncio's strerror repeats the address; errno is clearer
        reason = os.strerror(errno) if errno else first_line(e.os_error)
        return ServerUnreachable(f"cannot reach {at}: {reason.lower()} (is the server running?)")
    if isinstance(e, aiohttp.WSServerHandshakeError):
        return ServerRefused(http_refusal(url, e.status, e.message))
    if isinstance(e, aiohttp.ServerDisconnectedError):
        hint = " (an https server? try wss://)" if url.scheme != "wss" else ""
        return ServerRefused(f"{at} closed the connection during the WebSocket upgrade{hint}")
    if isinstance(e, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return ServerUnreachable(f"cannot reach {at}: no answer within {connect_timeout:g} s")
    if isinstance(e, aiohttp.ClientError):
        return ServerUnreachable(f"cannot connect to {at}: {first_line(e)}")
    return None


def message_text(message: protocol.Message) -> str:
    """A text or error message's words on one line (its first bytes if they are not UTF-8)."""
    try:
        text = message.text.strip()
    except ProtocolError:
        text = repr(message.payload[:80])
    return " ".join(text.split()) or "(no reason given)"


def close_reason(ws: aiohttp.ClientWebSocketResponse) -> str:
    code = ws.close_code
    if code is None or code == 1006:
        return " (closed without a goodbye)"
    return f" (code {code})"


def http_refusal(url: URL, status: int, message: str) -> str:
    at = where(url)
    if status == 403:
        return f"{at} refused the connection (HTTP 403: origin or host not allowed)"
    if status == 404:
        return f"no Moshi chat endpoint at {url.with_query(None)} (HTTP 404)"
    if status == 503:
        return f"{at} is busy or not ready (HTTP 503)"
    return f"{at} refused the WebSocket upgrade (HTTP {status} {message})".rstrip()


def _ssl_reason(e: aiohttp.ClientConnectorSSLError) -> str:
    inner = getattr(e, "os_error", None) or e
    return getattr(inner, "reason", None) or first_line(inner)


def _plain_hint(e: aiohttp.ClientConnectorSSLError) -> str:
    reason = str(_ssl_reason(e)).upper()
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason or "PACKET_LENGTH_TOO_LONG" in reason:
        return "; is it a plain ws:// server?"
    return ""
