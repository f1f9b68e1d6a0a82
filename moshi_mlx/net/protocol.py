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
====  ==========  =========================================================================

Unknown kinds are ignored by both sides. Sampling settings travel as query parameters on the
WebSocket URL (``/api/chat?text_temperature=0.7&audio_topk=250``); :func:`parse_query` turns
them into :class:`~moshi_mlx.settings.EngineSettings` with clear errors.

Everything here is pure: no sockets, no threads, no codec, no MLX (tests check the import graph).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable, Mapping

from ..errors import MoshiError
from ..settings import EngineSettings, SamplingParams, TextControls

__all__ = [
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
    "QueryResult",
    "parse_query",
    "KNOWN_PARAMS",
    "SUPPORTED_PARAMS",
    "IGNORED_PARAMS",
]

#: Largest message accepted from a peer (an 80 ms Opus page is a few hundred bytes).
MAX_MESSAGE_BYTES = 256 * 1024


class Kind(IntEnum):
    HANDSHAKE = 0
    AUDIO = 1
    TEXT = 2
    CONTROL = 3
    METADATA = 4
    ERROR = 5
    PING = 6


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


def encode_ping() -> bytes:
    return encode(Kind.PING)


# -- query parameters --------------------------------------------------------------------------
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1_000_000
MAX_SEED = 2**63 - 1

MAX_REPETITION_PENALTY = 100.0
MAX_PAD_MULT = 100.0
MAX_PENALTY_CONTEXT = 100_000

#: Parameters that change sampling here (all that Kyutai's official client sends).
SUPPORTED_PARAMS = (
    "text_temperature", "text_topk", "audio_temperature", "audio_topk", "text_seed", "audio_seed", "seed",
    "pad_mult", "repetition_penalty", "repetition_penalty_context",
)
#: Parameters Kyutai's clients send that this engine accepts (after validation) but does not use.
IGNORED_PARAMS: tuple[str, ...] = ()
KNOWN_PARAMS = SUPPORTED_PARAMS + IGNORED_PARAMS


@dataclass(frozen=True)
class QueryResult:
    settings: EngineSettings
    applied: dict[str, Any] = field(default_factory=dict)  # supported parameters given, parsed
    ignored: dict[str, str] = field(default_factory=dict)  # known parameter -> why it has no effect
    unknown: tuple[str, ...] = ()  # names nobody here knows (ignored)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary for the metadata message."""
        s = self.settings
        return {
            "text_temperature": s.text.temperature,
            "text_topk": s.text.top_k,
            "audio_temperature": s.audio.temperature,
            "audio_topk": s.audio.top_k,
            "seed": s.seed,
            "text_seed": s.seeds[0],
            "audio_seed": s.seeds[1],
            "repetition_penalty": s.text_controls.repetition_penalty,
            "repetition_penalty_context": s.text_controls.repetition_penalty_context,
            "pad_mult": s.text_controls.pad_mult,
        }


def _float(name: str, raw: str, lo: float, hi: float, lo_open: bool = False) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ParamError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ParamError(f"{name} must be a finite number, got {raw!r}")
    if value < lo or (lo_open and value == lo) or value > hi:
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ParamError(f"{name} must be {low} and <= {hi:g}, got {raw!r}")
    return value


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    text = raw.strip()
    try:
        value = int(text)
    except ValueError:
        # Accept "25.0" (some clients format every number as a float), nothing fractional.
        try:
            as_float = float(text)
        except ValueError:
            raise ParamError(f"{name} must be an integer, got {raw!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ParamError(f"{name} must be an integer, got {raw!r}")
        value = int(as_float)
    if not lo <= value <= hi:
        raise ParamError(f"{name} must be between {lo} and {hi}, got {raw!r}")
    return value


def _pairs(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(params, Mapping):
        # A MultiDict (aiohttp's request.query) is a Mapping whose items() keeps repeated keys.
        return [(str(k), str(v)) for k, v in params.items()]
    return [(str(k), str(v)) for k, v in params]


def parse_query(
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    defaults: EngineSettings = EngineSettings(),
) -> QueryResult:
    """Turn the WebSocket URL's query parameters into engine settings.

    Missing parameters keep ``defaults``. Raises :class:`ParamError` for a malformed or
    out-of-range value, or a parameter given twice with different values. Unknown names are
    returned in ``unknown``; Kyutai's parameters this engine has no use for are validated and
    reported in ``ignored``.

    ``seed`` seeds both streams; ``text_seed`` and ``audio_seed`` take precedence for their stream.
    """
    values: dict[str, str] = {}
    unknown: list[str] = []
    for name, raw in _pairs(params):
        if name not in KNOWN_PARAMS:
            if name not in unknown:
                unknown.append(name)
            continue
        if name in values and values[name] != raw:
            raise ParamError(f"{name} is given twice ({values[name]!r} and {raw!r})")
        values[name] = raw

    applied: dict[str, Any] = {}
    text_t, text_k = defaults.text.temperature, defaults.text.top_k
    audio_t, audio_k = defaults.audio.temperature, defaults.audio.top_k
    if "text_temperature" in values:
        text_t = applied["text_temperature"] = _float("text_temperature", values["text_temperature"], 0.0, MAX_TEMPERATURE)
    if "audio_temperature" in values:
        audio_t = applied["audio_temperature"] = _float("audio_temperature", values["audio_temperature"], 0.0, MAX_TEMPERATURE)
    if "text_topk" in values:
        text_k = applied["text_topk"] = _int("text_topk", values["text_topk"], 0, MAX_TOP_K)
    if "audio_topk" in values:
        audio_k = applied["audio_topk"] = _int("audio_topk", values["audio_topk"], 0, MAX_TOP_K)

    ignored: dict[str, str] = {}
    # `seed` seeds both streams; `text_seed` / `audio_seed` take precedence for their own stream.
    seeds = {name: _int(name, values[name], 0, MAX_SEED) for name in ("seed", "text_seed", "audio_seed") if name in values}
    applied.update(seeds)
    seed = seeds.get("seed", defaults.seed)
    text_seed = seeds.get("text_seed", defaults.text_seed if "seed" not in seeds else None)
    audio_seed = seeds.get("audio_seed", defaults.audio_seed if "seed" not in seeds else None)

    controls = defaults.text_controls
    penalty, context, pad_mult = controls.repetition_penalty, controls.repetition_penalty_context, controls.pad_mult
    if "repetition_penalty" in values:
        penalty = applied["repetition_penalty"] = _float(
            "repetition_penalty", values["repetition_penalty"], 0.0, MAX_REPETITION_PENALTY, lo_open=True
        )
    if "repetition_penalty_context" in values:
        context = applied["repetition_penalty_context"] = _int(
            "repetition_penalty_context", values["repetition_penalty_context"], 0, MAX_PENALTY_CONTEXT
        )
    if "pad_mult" in values:
        pad_mult = applied["pad_mult"] = _float("pad_mult", values["pad_mult"], -MAX_PAD_MULT, MAX_PAD_MULT)

    try:
        settings = EngineSettings(
            text=SamplingParams(text_t, text_k),
            audio=SamplingParams(audio_t, audio_k),
            seed=seed,
            text_controls=TextControls(penalty, context, pad_mult),
            text_seed=text_seed,
            audio_seed=audio_seed,
            kv_bits=defaults.kv_bits,  # memory settings are the server's, not the client's
            context=defaults.context,
        )
    except ValueError as e:  # defensive: the checks above should make this unreachable
        raise ParamError(str(e)) from None
    return QueryResult(settings, applied, ignored, tuple(unknown))
