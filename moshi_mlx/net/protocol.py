"""Kyutai's WebSocket protocol for Moshi: message kinds, encode/decode, query parameters.

Every message is one binary WebSocket message whose first byte says what it is:

====  ==========  =========================================================================
byte  kind        payload
====  ==========  =========================================================================
0x00  handshake   empty (what Kyutai's servers send), or u32 protocol version + u32 model
                  version, little-endian
0x01  audio       Ogg/Opus pages, 24 kHz mono
0x02  text        a UTF-8 transcript piece (Moshi's inner monologue)
0x03  control     one byte (0 start, 1 end of turn, 2 pause, 3 restart)
0x04  metadata    a JSON object
0x05  error       a UTF-8 message
0x06  ping        empty
0x08  user words  ours, not Kyutai's: a JSON object ``{"words": [{"text", "start", "end"}]}``, the user's
                  words from the server's speech-to-text model (``local_web --transcribe-user``), times in
                  seconds from the conversation's first audio frame; sent only to a client that asked
                  with the query parameter ``user_words=1``
====  ==========  =========================================================================

Unknown kinds are ignored by our server and client. Kyutai's web client throws on a kind it does not know
(7 is its "colored text"), hence 0x08 only on request: Kyutai's client never asks, so never receives it. Sampling settings travel as query parameters on the
WebSocket URL (``/api/chat?text_temperature=0.7&audio_topk=250``); :func:`parse_query` turns
them into :class:`~moshi_mlx.settings.EngineSettings` with clear errors.

Everything here is pure: no sockets, no threads, no codec, no MLX (tests check the import graph).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Iterable, Mapping

from ..errors import MoshiError
from ..settings import KNOBS, TEXT_ONLY_KNOBS, TEXT_ONLY_NOTE, EngineSettings, in_effect, knob_values, with_knobs

__all__ = [
    "CHAT_PATH",
    "INFO_PATH",
    "DEFAULT_PORT",
    "Kind",
    "Control",
    "Message",
    "Handshake",
    "ProtocolError",
    "EmptyMessage",
    "MessageTooLarge",
    "ParamError",
    "MAX_MESSAGE_BYTES",
    "decode",
    "decode_handshake",
    "encode",
    "encode_handshake",
    "encode_audio",
    "encode_text",
    "encode_control",
    "encode_metadata",
    "encode_error",
    "encode_ping",
    "encode_user_words",
    "USER_WORDS_PARAM",
    "QueryResult",
    "parse_query",
    "encode_query",
    "KNOWN_PARAMS",
    "SUPPORTED_PARAMS",
    "IGNORED_PARAMS",
    "PERSONA_PARAMS",
    "MAX_PROMPT_CHARS",
    "voice_name",
    "encode_persona",
]

#: Largest message accepted from a peer (an 80 ms Opus page is a few hundred bytes).
MAX_MESSAGE_BYTES = 256 * 1024

#: Where Kyutai's servers (and ours) listen: the WebSocket endpoint, our JSON status, the usual port.
CHAT_PATH = "/api/chat"
INFO_PATH = "/api/info"
DEFAULT_PORT = 8998


class Kind(IntEnum):
    HANDSHAKE = 0
    AUDIO = 1
    TEXT = 2
    CONTROL = 3
    METADATA = 4
    ERROR = 5
    PING = 6
    USER_WORDS = 8


#: The query parameter by which a client asks for 0x08 user-words messages (our web UI and client send it).
USER_WORDS_PARAM = "user_words"

class Control(IntEnum):
    START = 0
    END_TURN = 1
    PAUSE = 2
    RESTART = 3


class ProtocolError(ValueError):
    """A message that cannot be understood (empty, too large, bad UTF-8 / JSON ...)."""


class EmptyMessage(ProtocolError):
    pass


class MessageTooLarge(ProtocolError):
    pass


class ParamError(MoshiError, ValueError):
    """A bad query parameter; the message is meant for the person who sent it."""


@dataclass(frozen=True)
class Message:
    kind: Kind
    payload: bytes = b""

    @property
    def text(self) -> str:
        """The payload as UTF-8 (text and error messages)."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{self.kind.name.lower()} message is not valid UTF-8") from e

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object (metadata messages)."""
        try:
            value = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError("metadata message is not valid UTF-8 JSON") from e
        if not isinstance(value, dict):
            raise ProtocolError("metadata message must be a JSON object")
        return value

    def control(self) -> int:
        """The control code (see :class:`Control`); unknown codes are returned as plain ints."""
        if len(self.payload) != 1:
            raise ProtocolError(f"control message must carry exactly one byte, got {len(self.payload)}")
        code = self.payload[0]
        try:
            return Control(code)
        except ValueError:
            return code


@dataclass(frozen=True)
class Handshake:
    protocol_version: int = 0
    model_version: int = 0


def decode(data: bytes | bytearray | memoryview, max_bytes: int = MAX_MESSAGE_BYTES) -> Message | None:
    """Split a binary message into kind and payload.

    Returns None for a kind this side does not know (to be ignored); raises :class:`ProtocolError`
    for an empty or oversized message.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary message, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise EmptyMessage("empty message")
    if len(data) > max_bytes:
        raise MessageTooLarge(f"message of {len(data)} bytes is larger than the limit of {max_bytes}")
    try:
        kind = Kind(data[0])
    except ValueError:
        return None
    return Message(kind, data[1:])


def decode_handshake(message: Message) -> Handshake:
    """Accept both the bare handshake byte and the one carrying two little-endian u32 versions."""
    if message.kind != Kind.HANDSHAKE:
        raise ProtocolError(f"expected a handshake, got {message.kind.name.lower()}")
    if not message.payload:
        return Handshake()
    if len(message.payload) == 8:
        return Handshake(*struct.unpack("<II", message.payload))
    raise ProtocolError(f"handshake payload must be empty or 8 bytes, got {len(message.payload)}")


# -- encoders -------------------------------------------------------------------------------
def encode(kind: Kind, payload: bytes = b"") -> bytes:
    return bytes((int(kind),)) + bytes(payload)


def encode_handshake(protocol_version: int | None = None, model_version: int = 0) -> bytes:
    """Bare ``b"\\x00"`` (Kyutai's servers) unless a protocol version is given."""
    if protocol_version is None:
        return encode(Kind.HANDSHAKE)
    return encode(Kind.HANDSHAKE, struct.pack("<II", protocol_version, model_version))


def encode_audio(ogg_pages: bytes) -> bytes:
    return encode(Kind.AUDIO, ogg_pages)


def encode_text(text: str) -> bytes:
    return encode(Kind.TEXT, text.encode("utf-8"))


def encode_control(code: int) -> bytes:
    if not 0 <= int(code) <= 255:
        raise ValueError(f"control code must fit in one byte, got {code}")
    return encode(Kind.CONTROL, bytes((int(code),)))


def encode_metadata(data: Mapping[str, Any]) -> bytes:
    return encode(Kind.METADATA, json.dumps(dict(data), separators=(",", ":")).encode("utf-8"))


def encode_error(message: str) -> bytes:
    return encode(Kind.ERROR, message.encode("utf-8"))


def encode_user_words(words: Iterable[Any]) -> bytes:
    """0x08: the user's words (objects with `text`, `start`, `end`, e.g. moshi_mlx.transcribe.Word)."""
    items = [{"text": w.text, "start": round(float(w.start), 3), "end": round(float(w.end), 3)} for w in words]
    return encode(Kind.USER_WORDS, json.dumps({"words": items}, ensure_ascii=False).encode("utf-8"))


def encode_ping() -> bytes:
    return encode(Kind.PING)


# -- query parameters --------------------------------------------------------------------------
#: Parameters that change sampling here (all that Kyutai's official client sends): the knobs' names.
SUPPORTED_PARAMS = tuple(KNOBS)
#: Parameters Kyutai's clients send that this engine accepts (after validation) but does not use.
IGNORED_PARAMS: tuple[str, ...] = ()
#: A persona model's role prompt and voice, named as NVIDIA's PersonaPlex client sends them (an empty value, as
#: that client sends when nothing is chosen, leaves the server's default).
PERSONA_PARAMS = ("text_prompt", "voice_prompt")
KNOWN_PARAMS = SUPPORTED_PARAMS + IGNORED_PARAMS + PERSONA_PARAMS
#: Longest role prompt taken from a URL, in characters, before the tokenizer ever sees it (the model's context,
#: checked by the server, is the real bound; this one only keeps a URL from costing more than a prompt can use).
MAX_PROMPT_CHARS = 8000
#: What a voice named in a URL may hold: a preset's name, never a path on the server.
_VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: The extension NVIDIA's client appends to a preset's name (it sends NATF2.pt).
_PRESET_SUFFIX = ".pt"


@dataclass(frozen=True)
class QueryResult:
    settings: EngineSettings
    applied: dict[str, Any] = field(default_factory=dict)  # supported parameters given, parsed
    ignored: dict[str, str] = field(default_factory=dict)  # known parameter -> why it has no effect
    unknown: tuple[str, ...] = ()  # names nobody here knows (ignored)
    persona: dict[str, str] = field(default_factory=dict)  # "text_prompt" / "voice": what the URL chose
    user_words: bool = False  # the client asked for 0x08 user-words messages (USER_WORDS_PARAM=1)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary for the metadata message: every knob, seeds as in effect."""
        summary = knob_values(self.settings)
        summary["text_seed"], summary["audio_seed"] = self.settings.seeds
        return summary


def encode_query(values: Mapping[str, Any]) -> dict[str, str]:
    """Query parameters for the knobs given (None: the server's default), the inverse of parse_query.

    Kyutai's servers take one seed per stream, ours also `seed`: a lone `seed` is sent as all three.
    """
    params = {name: str(value) for name, value in values.items() if value is not None}
    if "seed" in params:
        params.setdefault("text_seed", params["seed"])
        params.setdefault("audio_seed", params["seed"])
    return params


def _pairs(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(params, Mapping):
        # A MultiDict (aiohttp's request.query) is a Mapping whose items() keeps repeated keys.
        return [(str(k), str(v)) for k, v in params.items()]
    return [(str(k), str(v)) for k, v in params]


def parse_query(
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    defaults: EngineSettings = EngineSettings(),
    text_only: bool = False,
) -> QueryResult:
    """Turn the WebSocket URL's query parameters into engine settings.

    Missing parameters keep ``defaults``. Raises :class:`ParamError` for a malformed or
    out-of-range value, or a parameter given twice with different values. Unknown names are
    returned in ``unknown``; Kyutai's parameters this engine has no use for are validated and
    reported in ``ignored``.

    ``seed`` seeds both streams; ``text_seed`` and ``audio_seed`` take precedence for their stream.
    For a ``text_only`` (speech-to-text) model the knobs that do nothing there (all but
    :data:`~moshi_mlx.settings.TEXT_ONLY_KNOBS`) are validated, then reported in ``ignored`` with the
    reason rather than refused: Kyutai's official client sends every knob to every server.
    """
    values: dict[str, str] = {}
    unknown: list[str] = []
    user_words = False
    for name, raw in _pairs(params):
        if name == USER_WORDS_PARAM:
            if raw not in ("0", "1"):
                raise ParamError(f"{USER_WORDS_PARAM} must be 0 or 1, got {raw!r}")
            user_words = raw == "1"
            continue
        if name not in KNOWN_PARAMS:
            if name not in unknown:
                unknown.append(name)
            continue
        if name in values and values[name] != raw:
            raise ParamError(f"{name} is given twice ({values[name]!r} and {raw!r})")
        values[name] = raw

    persona = _persona(values)
    # In the table's order, whatever order the URL had.
    applied = {name: _parse(name, values[name]) for name in SUPPORTED_PARAMS if name in values}
    ignored: dict[str, str] = {}
    if text_only:
        ignored = {name: TEXT_ONLY_NOTE for name in applied if name not in TEXT_ONLY_KNOBS}
        applied = {name: value for name, value in applied.items() if name in TEXT_ONLY_KNOBS}
    changes = dict(applied)
    if "seed" in applied:  # a query's `seed` replaces the server's per-stream seeds too
        changes.setdefault("text_seed", None)
        changes.setdefault("audio_seed", None)
    try:
        settings = with_knobs(defaults, changes)  # memory settings (kv_bits, context) stay the server's
    except ValueError as e:  # defensive: the knobs' checks above should make this unreachable
        raise ParamError(str(e)) from None
    if persona:  # the model checks them (a voice it has, a prompt that fits) when the conversation starts
        settings = replace(settings, **persona)
    return QueryResult(in_effect(settings, text_only), applied, ignored, tuple(unknown), persona=persona,
                       user_words=user_words)


def voice_name(raw: str) -> str:
    """A voice as a URL names it: a preset's name (NVIDIA's client's NAME.pt taken as NAME), never a path."""
    name = raw.strip().removesuffix(_PRESET_SUFFIX)
    if not _VOICE_NAME.fullmatch(name):
        raise ParamError(f"voice_prompt {raw[:40]!r} is not a voice name (the server's voices are listed at {INFO_PATH})")
    return name


def encode_persona(text_prompt: str | None = None, voice: str | None = None) -> dict[str, str]:
    """The query parameters of a role prompt and a voice (None: the server's default), as NVIDIA's client names
    them; checked as the server will (a voice is a name, never a path; a prompt within MAX_PROMPT_CHARS)."""
    return {PERSONA_PARAMS[0] if k == "text_prompt" else PERSONA_PARAMS[1]: v
            for k, v in _persona({"text_prompt": text_prompt or "", "voice_prompt": voice or ""}).items()}


def _persona(values: Mapping[str, str]) -> dict[str, str]:
    """The role prompt and the voice the URL gives (empty values: the server's defaults)."""
    out: dict[str, str] = {}
    prompt = values.get("text_prompt", "").strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ParamError(f"text_prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are taken")
    if prompt:
        out["text_prompt"] = prompt
    if values.get("voice_prompt", "").strip():
        out["voice"] = voice_name(values["voice_prompt"])
    return out


def _parse(name: str, raw: str) -> Any:
    try:
        return KNOBS[name].parse(raw)
    except ValueError as e:
        raise ParamError(str(e)) from None
