"""Kyutai's speech-to-text WebSocket protocol (moshi-server's `/api/asr-streaming`), as facts and pack/unpack.

Read from Kyutai's Rust server (rust/moshi-server/src/asr.rs, batched_asr.rs, main.rs) and its clients
(delayed-streams-modeling `scripts/stt_from_*_rust_server.py`). Every message is one binary WebSocket message
holding one MessagePack map whose "type" names it; other keys are its fields (unknown keys are ignored, as
serde does).

Client -> server:

=========  ===================  ==========================================================================
type       fields               meaning
=========  ===================  ==========================================================================
Audio      pcm: [float]         24 kHz mono samples, any count (clients send 1920 = 80 ms, or 1 s of silence)
Marker     id: int              echoed once the audio sent before it has been transcribed (delay included)
Init       -                    (batched server's internal reset; ignored)
OggOpus    data: bytes          Ogg/Opus pages (not supported here: answered with an Error)
=========  ===================  ==========================================================================

Server -> client: ``Ready`` (on connect), ``Word {text, start_time}`` (a word's text is complete),
``EndWord {stop_time}`` (the last word's end), ``Step {step_idx, prs, buffered_pcm}`` (each model step: the
extra heads' first probabilities, the samples waiting for a whole frame), ``Marker {id}``, ``Error {message}``.
Times are seconds of the client's audio (its first sample is 0). The API key travels in the ``kyutai-api-key``
header or the ``auth_id`` query parameter.

Pure: no sockets, no threads, no MLX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import msgpack
import numpy as np

from ..audio.frames import SAMPLE_RATE
from ..errors import MoshiError

ASR_PATH = "/api/asr-streaming"
API_KEY_HEADER = "kyutai-api-key"
API_KEY_QUERY = "auth_id"

#: The longest Audio message accepted: 10 s (what Kyutai's batched server feeds itself after a POSTed file).
MAX_PCM_SAMPLES = 10 * SAMPLE_RATE
#: A message's largest size: MAX_PCM_SAMPLES float64 samples (9 bytes each in MessagePack) and some room.
MAX_MESSAGE_BYTES = MAX_PCM_SAMPLES * 9 + 4096
_MAX_TEXT = 4096  # longest string in an in-message (type names, future fields)
_I64 = 2**63

IN_TYPES = ("Audio", "Marker", "Init", "OggOpus")
OUT_TYPES = ("Ready", "Word", "EndWord", "Step", "Marker", "Error")


class AsrProtocolError(MoshiError, ValueError):
    """A message that does not follow the protocol (one line, sent back as an Error message)."""


@dataclass(frozen=True)
class Audio:
    pcm: np.ndarray  # float32, 1-D


@dataclass(frozen=True)
class Marker:
    id: int


@dataclass(frozen=True)
class Init:
    pass


@dataclass(frozen=True)
class OggOpus:
    data: bytes


InMessage = Union[Audio, Marker, Init, OggOpus]


def _unpack_map(data: bytes, max_array: int) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise AsrProtocolError(f"message of {len(data)} bytes is over the limit of {MAX_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_str_len=_MAX_TEXT, max_bin_len=MAX_MESSAGE_BYTES,
            max_array_len=max_array, max_map_len=64, max_ext_len=0,
        )
    except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as e:
        if "exceeds max_" in str(e):  # msgpack's own bound on an array, string or map
            raise AsrProtocolError(f"a field is over the limit: {e}") from None
        raise AsrProtocolError(f"not a MessagePack message: {e}") from None
    if not isinstance(msg, dict):
        raise AsrProtocolError(f"a message is a MessagePack map with a 'type', got {type(msg).__name__}")
    return msg


def _type_of(msg: dict[str, Any], known: tuple[str, ...]) -> str:
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise AsrProtocolError("a message needs a string 'type'")
    if kind not in known:
        raise AsrProtocolError(f"unknown message type {kind[:40]!r}; expected one of {', '.join(known)}")
    return kind


def _int(msg: dict[str, Any], key: str) -> int:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AsrProtocolError(f"{msg['type']}: '{key}' must be an integer")
    if not -_I64 <= value < _I64:
        raise AsrProtocolError(f"{msg['type']}: '{key}' is out of the 64-bit range")
    return value


def _pcm(msg: dict[str, Any]) -> np.ndarray:
    pcm = msg.get("pcm")
    if not isinstance(pcm, list):
        raise AsrProtocolError("Audio: 'pcm' must be an array of numbers")
    if len(pcm) > MAX_PCM_SAMPLES:
        raise AsrProtocolError(f"Audio: {len(pcm)} samples is over the limit of {MAX_PCM_SAMPLES} per message")
    try:
        arr = np.asarray(pcm) if pcm else np.zeros(0, np.float32)
    except (ValueError, TypeError, OverflowError):  # ragged nesting, integers past 64 bits beside others
        arr = np.zeros((0, 0))
    if arr.ndim != 1 or arr.dtype.kind not in "fiu":  # strings, nested arrays, booleans, None
        raise AsrProtocolError("Audio: 'pcm' must be an array of numbers")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise AsrProtocolError("Audio: 'pcm' holds a NaN or an infinity")
    return arr


def unpack_in(data: bytes) -> InMessage:
    """A client's message (server side); AsrProtocolError says what is wrong."""
    msg = _unpack_map(data, MAX_PCM_SAMPLES)
    kind = _type_of(msg, IN_TYPES)
    if kind == "Audio":
        return Audio(_pcm(msg))
    if kind == "Marker":
        return Marker(_int(msg, "id"))
    if kind == "OggOpus":
        raw = msg.get("data")
        if not isinstance(raw, (bytes, list)):
            raise AsrProtocolError("OggOpus: 'data' must be bytes")
        return OggOpus(bytes(raw) if isinstance(raw, bytes) else b"")
    return Init()


def _pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


# -- client -> server -------------------------------------------------------------------------------------------
def pack_audio(pcm: np.ndarray | list[float]) -> bytes:
    """An Audio message; samples as MessagePack float32, as Kyutai's scripts send them."""
    return msgpack.packb({"type": "Audio", "pcm": [float(x) for x in np.asarray(pcm, np.float32).reshape(-1)]},
                         use_single_float=True)


def pack_marker(marker_id: int) -> bytes:
    return _pack({"type": "Marker", "id": int(marker_id)})


# -- server -> client -------------------------------------------------------------------------------------------
def ready() -> dict[str, Any]:
    return {"type": "Ready"}


def word(text: str, start_time: float) -> dict[str, Any]:
    return {"type": "Word", "text": text, "start_time": float(start_time)}


def end_word(stop_time: float) -> dict[str, Any]:
    return {"type": "EndWord", "stop_time": float(stop_time)}


def step(step_idx: int, prs: list[float], buffered_pcm: int) -> dict[str, Any]:
    return {"type": "Step", "step_idx": int(step_idx), "prs": [float(p) for p in prs],
            "buffered_pcm": int(buffered_pcm)}


def marker(marker_id: int) -> dict[str, Any]:
    return {"type": "Marker", "id": int(marker_id)}


def error(message: str) -> dict[str, Any]:
    return {"type": "Error", "message": message}


def pack_out(msg: dict[str, Any]) -> bytes:
    """A server message (one of the builders above) as sent: a MessagePack map, floats as float64 (f64 in
    Rust for times; clients read float32 and float64 alike)."""
    return _pack(msg)


_OUT_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "Ready": {},
    "Word": {"text": (str,), "start_time": (float, int)},
    "EndWord": {"stop_time": (float, int)},
    "Step": {"step_idx": (int,), "prs": (list,), "buffered_pcm": (int,)},
    "Marker": {"id": (int,)},
    "Error": {"message": (str,)},
}


def unpack_out(data: bytes) -> dict[str, Any]:
    """A server's message (client side), its fields checked: a dict with 'type' and the fields above."""
    msg = _unpack_map(data, 1 << 16)
    kind = _type_of(msg, OUT_TYPES)
    for key, types in _OUT_FIELDS[kind].items():
        value = msg.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            raise AsrProtocolError(f"{kind}: '{key}' is missing or has the wrong type")
    if kind == "Step" and not all(isinstance(p, float) and math.isfinite(p) for p in msg["prs"]):
        raise AsrProtocolError("Step: 'prs' must be finite floats")
    return msg


__all__ = [
    "ASR_PATH", "API_KEY_HEADER", "API_KEY_QUERY", "MAX_PCM_SAMPLES", "MAX_MESSAGE_BYTES", "IN_TYPES", "OUT_TYPES",
    "AsrProtocolError", "Audio", "Marker", "Init", "OggOpus", "InMessage", "unpack_in", "pack_audio", "pack_marker",
    "ready", "word", "end_word", "step", "marker", "error", "pack_out", "unpack_out",
]
