"""Fuzzing (hypothesis, bounded: see tests/helpers/fuzz.py) of what parses a peer's bytes: the protocol's
decoder and query parser, the Opus page reader, and the remote client's message handling. Whatever arrives,
the answer is a result or the one documented error class with a one-line message, never another exception."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from moshi_mlx.net import protocol
from moshi_mlx.net.opus import OpusDecodeError, OpusFrames
from moshi_mlx.net.protocol import Kind, ParamError, ProtocolError
from moshi_mlx.net.remote import RemoteConversation
from tests.helpers.fuzz import MESSAGES, PAGES, PARSER_EXAMPLES, flipped, fuzz_settings


def one_line(text: str) -> bool:
    return bool(text) and "\n" not in text and "Traceback" not in text


@fuzz_settings(PARSER_EXAMPLES)
@given(MESSAGES)
def test_decode_gives_a_message_or_a_protocol_error(data):
    try:
        message = protocol.decode(data)
    except ProtocolError as e:
        assert one_line(str(e))
        return
    if message is None:
        return
    for read in (lambda: message.text, message.json, message.control, lambda: protocol.decode_handshake(message)):
        try:
            read()
        except ProtocolError as e:
            assert one_line(str(e))


NAMES = st.one_of(st.sampled_from(list(protocol.KNOWN_PARAMS) + ["seed"]), st.text(max_size=12))
VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "0x10", "-0", " 1", "1_000", "١", "true", ""]),
    st.integers(-2**65, 2**65).map(str),
    st.floats().map(repr),
)


@fuzz_settings(PARSER_EXAMPLES)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=6))
def test_query_strings_give_settings_or_one_line(pairs):
    try:
        result = protocol.parse_query(pairs)
    except ParamError as e:
        assert one_line(str(e)) and len(str(e)) < 300
        return
    assert all(np.isfinite(v) for v in result.applied.values() if isinstance(v, float))
    result.describe()


@fuzz_settings(PARSER_EXAMPLES)
@given(st.lists(st.one_of(flipped(PAGES[0]), flipped(PAGES[3]), st.binary(max_size=300)), min_size=1, max_size=4))
def test_opus_reader_survives_flipped_pages_and_recovers(pages):
    frames = OpusFrames()
    for page in pages:
        try:
            out = frames.decode(page)
        except OpusDecodeError as e:
            assert one_line(str(e))
            continue
        assert all(f.shape == (1920,) and f.dtype == np.float32 for f in out)
    # a fresh, valid stream afterwards decodes (the reader was reset after garbage)
    fresh = OpusFrames()
    assert sum(len(fresh.decode(p)) for p in PAGES) >= 1


@fuzz_settings(PARSER_EXAMPLES)
@given(st.lists(MESSAGES, max_size=12))
def test_remote_client_takes_any_message_stream(messages):
    seen: dict[str, list] = {"audio": [], "text": [], "notice": [], "info": []}
    conv = RemoteConversation(
        "ws://127.0.0.1:1", on_audio=seen["audio"].append, on_text=seen["text"].append,
        on_notice=seen["notice"].append, on_info=seen["info"].append,
    )
    conv.stats.frames_sent = 5
    conv._sent_at.extend([0.0] * 5)  # as if frames had gone out: the latency bookkeeping runs too
    for data in messages:
        conv._on_binary(data)
    assert all(f.shape == (1920,) for f in seen["audio"])
    assert all(isinstance(t, str) for t in seen["text"]) and all(isinstance(i, dict) for i in seen["info"])
    assert all(one_line(n) for n in seen["notice"]), seen["notice"]
    assert conv.stats.frames_received == len(seen["audio"])
    assert conv.stats.server_dropped >= 0  # the server's stats, whatever their types, read as a count


def test_the_remote_client_counts_what_it_cannot_use():
    """The fuzzers' oracle checked by hand: bad messages are counted, not raised."""
    conv = RemoteConversation("ws://127.0.0.1:1", on_audio=lambda f: None)
    for data in (b"", protocol.encode(Kind.TEXT, b"\xff"), protocol.encode(Kind.METADATA, b"[1]")):
        conv._on_binary(data)
    assert conv.stats.bad_messages == 3
