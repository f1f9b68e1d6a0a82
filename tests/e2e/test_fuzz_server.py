"""Fuzzing a real `local_web --demo` process (hypothesis, bounded: see tests/helpers/fuzz.py): each example is
one client with a random query string sending random and mutated messages (every kind, any length, Ogg pages
with bits flipped, text frames, a message over the size limits). The server must answer with the handshake or a
one-line 0x05 error, never close as a server error, free itself for the next client within seconds, write no
traceback in its log and not grow in memory; afterwards a clean client still has a conversation."""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from moshi_mlx.net import protocol
from moshi_mlx.net.protocol import Kind
from tests.helpers.fuzz import MESSAGES, PAGES, SERVER_EXAMPLES, fuzz_settings
from tests.helpers.web_process import LocalWeb

#: Memory the server may gain over the fuzzing once warm (MB): allocator noise, not a leak per client.
MAX_RSS_GROWTH_MB = 40
#: How long a client listens after its last message.
LISTEN_S = 0.2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalWeb(tmp_path_factory.mktemp("fuzz-server") / "server.log") as s:
        yield s


QUERY_NAMES = st.one_of(st.sampled_from(list(protocol.KNOWN_PARAMS) + ["seed"]), st.text(max_size=10))
QUERY_VALUES = st.one_of(st.text(max_size=10), st.sampled_from(["nan", "inf", "1e999", "-1", "0", "0.7", "250"]))
#: A query as pairs (encoded properly), or raw characters after the "?" (percent signs and all).
QUERIES = st.one_of(
    st.lists(st.tuples(QUERY_NAMES, QUERY_VALUES), max_size=4).map(urlencode),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#"), max_size=40),
)
#: What one client sends: binary messages, sometimes a text frame, rarely one past the size limits.
SENDS = st.lists(
    st.one_of(
        MESSAGES.map(lambda m: ("bytes", m)),
        st.text(max_size=30).map(lambda t: ("text", t)),
        st.sampled_from([protocol.MAX_MESSAGE_BYTES + 1, (1 << 20) + 1]).map(lambda n: ("bytes", b"\x01" + b"\0" * n)),
    ),
    max_size=8,
)


async def one_client(url: str, query: str, sends: list[tuple[str, object]]) -> tuple[list, int | None]:
    """Connect, send, listen a moment, leave; returns (protocol messages received, the server's close code)."""
    received = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(URL(f"{url}?{query}" if query else url, encoded=True), max_msg_size=0,
                                      timeout=aiohttp.ClientWSTimeout(ws_close=2.0)) as ws:
            for kind, data in sends:
                if ws.closed:
                    break
                try:
                    await (ws.send_bytes(data) if kind == "bytes" else ws.send_str(data))
                except (ConnectionError, aiohttp.ClientError):
                    break
            loop = asyncio.get_running_loop()
            deadline = loop.time() + LISTEN_S
            while not ws.closed and loop.time() < deadline:
                try:
                    msg = await asyncio.wait_for(ws.receive(), max(0.01, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if msg.type == aiohttp.WSMsgType.BINARY:
                    received.append(protocol.decode(msg.data, 1 << 30))
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
            code = ws.close_code
    return received, code


def test_random_clients_get_answers_and_the_server_keeps_serving(server):
    rss: list[float] = []
    stats = {"clients": 0, "refused": 0, "errors": 0, "cut": 0, "max_idle_s": 0.0}

    @fuzz_settings(SERVER_EXAMPLES)
    @given(QUERIES, SENDS)
    def one(query, sends):
        received, code = asyncio.run(one_client(server.ws, query, sends))
        stats["max_idle_s"] = max(stats["max_idle_s"], server.wait_idle(15.0))  # free for the next client
        stats["clients"] += 1
        if not received:  # only when a message past the limits was still going out as the server cut it (TCP reset)
            assert any(len(data) > protocol.MAX_MESSAGE_BYTES for _, data in sends), f"no answer (close code {code})"
            stats["cut"] += 1
            return
        first = received[0]
        assert first is not None and first.kind in (Kind.HANDSHAKE, Kind.ERROR), first
        if first.kind == Kind.ERROR:
            stats["refused"] += 1
            assert first.text.startswith("bad parameter: "), first.text
        for m in received:
            if m is not None and m.kind == Kind.ERROR:
                stats["errors"] += 1
                assert m.text and "\n" not in m.text and "Traceback" not in m.text, m.text
                assert not m.text.startswith(("server error", "the model failed")), m.text
        assert code != 1011, f"closed as a server error: {[m.text for m in received if m and m.kind == Kind.ERROR]}"
        if stats["clients"] == 5:
            rss.append(server.rss_mb())  # warm: the engine, codec and sockets have been used

    one()
    rss.append(server.rss_mb())
    log = server.log
    print(f"\nserver fuzz: {stats}; RSS {rss[0]:.0f} -> {rss[-1]:.0f} MB")
    assert "Traceback" not in log and "Exception" not in log and "conversation failed" not in log, log[-3000:]
    assert rss[-1] - rss[0] < MAX_RSS_GROWTH_MB, rss
    asyncio.run(a_clean_conversation(server.ws))


async def a_clean_conversation(url: str) -> None:
    """After the fuzzing, a well-behaved client: handshake, metadata, Moshi's audio back."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            first = await asyncio.wait_for(ws.receive(), 15)
            assert first.data == protocol.encode_handshake()
            kinds = set()
            for _ in range(3):
                for page in PAGES:
                    await ws.send_bytes(protocol.encode_audio(page))
                    await asyncio.sleep(0.04)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while Kind.AUDIO not in kinds and loop.time() < deadline:
                msg = await asyncio.wait_for(ws.receive(), deadline - loop.time())
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                kinds.add(protocol.decode(msg.data).kind)
            assert {Kind.METADATA, Kind.AUDIO} <= kinds, kinds
