"""moshi_mlx.server.session without a socket: the bounded outgoing queue, and a conversation's handling of
what a client sends (bad messages, undecodable audio) before any engine runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from moshi_mlx.net import protocol
from moshi_mlx.net.opus import OpusFrames
from moshi_mlx.net.protocol import Kind
from moshi_mlx.server.session import Conversation, OutQueue
from moshi_mlx.settings import EngineSettings

pytestmark = pytest.mark.asyncio


@dataclass
class FakeHost:
    """The server's side of :class:`~moshi_mlx.server.session.Host`; no engine is started in these tests."""

    engine: Any = None
    description: str = "fake"
    model_fields = {"model_kind": "conversation model", "conditioning": None}
    demo: bool = True
    lm_model_file: str = "lm.safetensors"
    max_pending: int = 2
    max_audio_backlog: int = 4
    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    stats_interval: float = 1.0


def conversation() -> Conversation:
    query = protocol.parse_query({}, EngineSettings())
    return Conversation(FakeHost(), ws=None, query=query, peer="test")  # type: ignore[arg-type]


def queued(conv: Conversation) -> list[protocol.Message]:
    return [protocol.decode(m) for m in iter(conv.out.get_nowait, None)]


async def test_out_queue_drops_audio_first():
    q = OutQueue(max_audio=3, max_total=6)
    assert all(q.put(b"a%d" % i, audio=True) for i in range(3))
    assert not q.put(b"a3", audio=True) and q.dropped_audio == 1
    assert q.put(b"t0") and q.put(b"t1") and q.put(b"t2")
    assert not q.put(b"t3") and q.dropped_other == 1
    assert len(q) == 6 and q.audio_backlog == 3
    assert await q.get() == b"a0"
    assert q.audio_backlog == 2 and q.put(b"a4", audio=True)
    drained = [q.get_nowait() for _ in range(len(q))]
    assert drained == [b"a1", b"a2", b"t0", b"t1", b"t2", b"a4"]
    assert q.get_nowait() is None and q.high_water == 6
    waiter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    q.put(b"late")
    assert await asyncio.wait_for(waiter, 1) == b"late"


async def test_undecodable_audio_is_reported_once_and_decoding_goes_on():
    conv = conversation()
    conv.on_binary(protocol.encode_audio(b"garbage, not Ogg" * 8))
    conv.on_binary(protocol.encode_audio(b"more garbage" * 8))  # within a second: not said again
    assert conv.bad_audio == 2
    errors = [m.text for m in queued(conv) if m.kind == Kind.ERROR]
    assert len(errors) == 1 and "the Opus decoder was reset" in errors[0]
    sender = OpusFrames()
    x = [0.1 * (i % 50) / 50 for i in range(1920)]
    for _ in range(10):
        page = sender.encode(x)
        if page:
            conv.on_binary(protocol.encode_audio(page))
    assert conv.bad_audio == 2 and conv.opus.bad_pages == 2  # good pages decode again


async def test_bad_messages_are_counted_and_answered():
    conv = conversation()
    conv.on_binary(b"")  # empty: no kind byte
    conv.on_binary(bytes([0x7F]) + b"from the future")  # unknown kind: ignored silently
    assert conv.bad_messages == 1 and conv.messages_in == 2
    assert [m.kind for m in queued(conv)] == [Kind.ERROR]


async def test_info_and_stats_carry_the_official_clients_fields():
    conv = conversation()
    info, stats = conv.info(), conv.stats()
    assert info["type"] == "info" and stats["type"] == "stats"
    for message in (info, stats):
        assert message["lm_model_file"] == "lm.safetensors" and "build_info" in message
    assert stats["frames_in"] == 0 and stats["dropped_out"] == 0
