"""Kyutai's STT WebSocket messages (moshi_mlx/net/asr_protocol.py): shapes as the Rust server's serde writes them
(a MessagePack map, "type" plus the fields), both directions, and one clear line for each kind of bad input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moshi_mlx.errors import MoshiError
from moshi_mlx.net import asr_protocol as asr
from tests.helpers.fuzz import PARSER_EXAMPLES, fuzz_settings


def test_client_messages_round_trip():
    pcm = np.array([0.0, 0.5, -0.25, 1.0], np.float32)
    got = asr.unpack_in(asr.pack_audio(pcm))
    assert isinstance(got, asr.Audio) and got.pcm.dtype == np.float32 and np.array_equal(got.pcm, pcm)
    assert asr.unpack_in(asr.pack_marker(-(2**63))) == asr.Marker(-(2**63))
    assert asr.unpack_in(msgpack.packb({"type": "Init"})) == asr.Init()
    # integers are samples too, an empty Audio is fine, unknown keys are ignored (serde's default)
    ints = asr.unpack_in(msgpack.packb({"type": "Audio", "pcm": [0, 1, -1], "extra": "x"}))
    assert ints.pcm.tolist() == [0.0, 1.0, -1.0]
    assert asr.unpack_in(msgpack.packb({"type": "Audio", "pcm": []})).pcm.shape == (0,)


def test_server_messages_have_the_rust_field_names():
    shapes = {
        "Ready": asr.ready(), "Word": asr.word("hello", 1.25), "EndWord": asr.end_word(1.5),
        "Step": asr.step(3, [0.1, 0.9], 120), "Marker": asr.marker(7), "Error": asr.error("bad"),
    }
    fields = {"Ready": set(), "Word": {"text", "start_time"}, "EndWord": {"stop_time"},
              "Step": {"step_idx", "prs", "buffered_pcm"}, "Marker": {"id"}, "Error": {"message"}}
    for kind, msg in shapes.items():
        back = asr.unpack_out(asr.pack_out(msg))
        assert back == msg and back["type"] == kind and set(back) - {"type"} == fields[kind]
    assert tuple(shapes) == asr.OUT_TYPES


@pytest.mark.parametrize("data, why", [
    (b"", "not a MessagePack message"),
    (b"\xc1", "not a MessagePack message"),
    (msgpack.packb({"type": "Marker", "id": 1}) + b"\x00", "not a MessagePack message"),
    (msgpack.packb("Audio"), "MessagePack map"),
    (msgpack.packb({"type": 3}), "string 'type'"),
    (msgpack.packb({"type": "Word", "text": "x", "start_time": 0.0}), "unknown message type 'Word'"),
    (msgpack.packb({"type": "Audio"}), "array of numbers"),
    (msgpack.packb({"type": "Audio", "pcm": [[0.1]]}), "array of numbers"),
    (msgpack.packb({"type": "Audio", "pcm": [[0.1], [0.1, 0.2]]}), "array of numbers"),  # ragged: numpy refuses
    (msgpack.packb({"type": "Audio", "pcm": [True, False]}), "array of numbers"),
    (msgpack.packb({"type": "Audio", "pcm": [0.1, None]}), "array of numbers"),
    (msgpack.packb({"type": "Audio", "pcm": [float("inf")]}), "NaN or an infinity"),
    (msgpack.packb({"type": "Marker"}), "'id' must be an integer"),
    (msgpack.packb({"type": "Marker", "id": True}), "'id' must be an integer"),
    (msgpack.packb({"type": "Marker", "id": 2**64 - 1}), "64-bit range"),
    (msgpack.packb({"type": "Audio", "pcm": [0.0] * (asr.MAX_PCM_SAMPLES + 1)}, use_single_float=True),
     "over the limit"),
    (b"\x00" * (asr.MAX_MESSAGE_BYTES + 1), "over the limit"),
])
def test_bad_client_messages_are_refused_in_one_line(data, why):
    with pytest.raises(asr.AsrProtocolError, match=why) as caught:
        asr.unpack_in(data)
    assert isinstance(caught.value, MoshiError) and "\n" not in str(caught.value)


def test_a_client_checks_what_the_server_sends():
    with pytest.raises(asr.AsrProtocolError, match="'start_time' is missing or has the wrong type"):
        asr.unpack_out(msgpack.packb({"type": "Word", "text": "x", "start_time": "0"}))
    with pytest.raises(asr.AsrProtocolError, match="unknown message type 'Audio'"):
        asr.unpack_out(asr.pack_audio([0.0]))
    with pytest.raises(asr.AsrProtocolError, match="finite floats"):
        asr.unpack_out(asr.pack_out(asr.step(1, [float("nan")], 0)))


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_MAPS = st.fixed_dictionaries({"type": st.sampled_from([*asr.IN_TYPES, "Word", ""])},
                              optional={"pcm": _VALUES, "id": _VALUES, "data": _VALUES})


@fuzz_settings(PARSER_EXAMPLES)
@given(st.one_of(st.binary(max_size=64), _MAPS.map(msgpack.packb), _VALUES.map(msgpack.packb)))
def test_any_bytes_are_a_message_or_one_protocol_error(data):
    try:
        msg = asr.unpack_in(data)
    except asr.AsrProtocolError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(msg, (asr.Audio, asr.Marker, asr.Init, asr.OggOpus))
