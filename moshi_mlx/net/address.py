"""Where the Moshi server is: the chat URL from what a user types, and sampling settings as its query.

Kyutai's servers take sampling settings as query parameters on the WebSocket URL
(``/api/chat?text_temperature=0.7&audio_topk=250``); see :mod:`moshi_mlx.net.protocol`.
"""

from __future__ import annotations

from typing import Any, Mapping

from yarl import URL

from .failures import BadUrl

DEFAULT_URL = "ws://localhost:8998"
CHAT_PATH = "/api/chat"


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
        u = u.with_path(CHAT_PATH)
    extra = {k: str(v) for k, v in (params or {}).items() if v is not None}
    return u.update_query(extra) if extra else u


def sampling_params(**settings: Any) -> dict[str, Any]:
    """Query parameters for the sampling settings given (None: the server's default).

    Names are the protocol's (text_temperature, text_topk, ..., seed, text_seed, audio_seed). Kyutai's
    servers take one seed per stream, ours also `seed`: a lone `seed` is sent as all three.
    """
    params = {k: v for k, v in settings.items() if v is not None}
    if "seed" in params:
        params.setdefault("text_seed", params["seed"])
        params.setdefault("audio_seed", params["seed"])
    return params
