"""Where the Moshi server is: the chat URL from what a user types, and sampling settings as its query.

Kyutai's servers take sampling settings as query parameters on the WebSocket URL
(``/api/chat?text_temperature=0.7&audio_topk=250``); see :mod:`moshi_mlx.net.protocol`.
"""

from __future__ import annotations

from typing import Any, Mapping

from yarl import URL

from . import protocol
from .failures import BadUrl

DEFAULT_URL = f"ws://localhost:{protocol.DEFAULT_PORT}"


def chat_url(url: str, params: Mapping[str, Any] | None = None) -> URL:
    """``ws(s)://host:port/api/chat?...`` from what a user types.

    Accepts ws/wss, http/https (mapped to ws/wss) and a bare ``host:port`` (ws). An empty path or
    ``/`` means the chat endpoint; ``params`` (None values left out) are added to the query.
    """
    text = url.strip()
    if not text:
        raise BadUrl("empty URL; use ws://HOST:PORT or wss://HOST:PORT")
    if "://" not in text:
        text = "ws://" + text
    try:
        u = URL(text)
    except (ValueError, TypeError) as e:
        raise BadUrl(f"bad URL {url!r}: {e}") from None
    schemes = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
    if u.scheme not in schemes:
        raise BadUrl(f"bad URL {url!r}: the scheme must be ws://, wss://, http:// or https://")
    try:
        host, _ = u.host, u.port  # reading the port also checks it
    except ValueError as e:
        raise BadUrl(f"bad URL {url!r}: {e}") from None
    if not host:
        raise BadUrl(f"bad URL {url!r}: no host name")
    u = u.with_scheme(schemes[u.scheme])
    if u.path in ("", "/"):
        u = u.with_path(protocol.CHAT_PATH)
    extra = {k: str(v) for k, v in (params or {}).items() if v is not None}
    return u.update_query(extra) if extra else u


def sampling_params(**settings: Any) -> dict[str, str]:
    """Query parameters for the sampling knobs given, by their protocol names (None: the server's default)."""
    return protocol.encode_query(settings)
