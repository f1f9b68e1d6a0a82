"""A real `local_web --demo` process under abuse: fuzzing, 100 clients at once, slowloris.

Fuzzing a real `local_web --demo` process (hypothesis, bounded: see tests/helpers/fuzz.py): each example is
one client with a random query string sending random and mutated messages (every kind, any length, Ogg pages
with bits flipped, text frames, a message over the size limits). The server must answer with the handshake or a
one-line 0x05 error, never close as a server error, free itself for the next client within seconds, write no
traceback in its log and not grow in memory; afterwards a clean client still has a conversation.

Load: 100 clients connecting at once get one conversation and 99 one-line busy refusals while the page and
/api/info still load. Slowloris: clients that open HTTP connections and never finish their request (or never
send a byte) do not keep anyone else from the page or a conversation."""

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
from moshi_mlx.server.app import IDLE_CONNECTION_S
from tests.helpers.fuzz import MESSAGES, PAGES, SERVER_EXAMPLES, fuzz_settings
from tests.helpers.web_process import LocalWeb

#: Memory the server may gain over the fuzzing once warm (MB): allocator noise, not a leak per client.
MAX_RSS_GROWTH_MB = 40
#: How long a client waits for the server's first message, and listens after it.
FIRST_ANSWER_S = 15.0
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
            deadline = loop.time() + FIRST_ANSWER_S  # the engine's reset comes first: slow on a loaded machine
            while not ws.closed and loop.time() < deadline:
                try:
                    msg = await asyncio.wait_for(ws.receive(), max(0.01, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if msg.type == aiohttp.WSMsgType.BINARY:
                    if not received:
                        deadline = loop.time() + LISTEN_S
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


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------

#: Clients that connect at once; the page is fetched this many times meanwhile.
STORM_CLIENTS = 100
PAGE_LOADS = 10


async def storm(server: LocalWeb) -> dict:
    loop = asyncio.get_running_loop()
    results: list[tuple[str, float]] = []
    pages: list[tuple[int, float]] = []
    sockets = []

    async def client(session: aiohttp.ClientSession) -> None:
        t0 = loop.time()
        ws = await session.ws_connect(server.ws)
        sockets.append(ws)
        msg = await ws.receive(timeout=30)
        m = protocol.decode(msg.data)
        results.append(("handshake" if m.kind == Kind.HANDSHAKE else m.text, loop.time() - t0))

    async def page(session: aiohttp.ClientSession, path: str) -> None:
        t0 = loop.time()
        async with session.get(server.http + path) as r:
            await r.read()
            pages.append((r.status, loop.time() - t0))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [client(session) for _ in range(STORM_CLIENTS)]
        tasks += [page(session, "/" if i % 2 else "/api/info") for i in range(PAGE_LOADS)]
        t0 = loop.time()
        await asyncio.gather(*tasks)
        took = loop.time() - t0
        for ws in sockets:
            await ws.close()
    return {"results": results, "pages": pages, "seconds": took}


def test_a_hundred_clients_at_once_get_one_conversation_and_busy_refusals(server):
    server.wait_idle()
    out = asyncio.run(storm(server))
    answers = [a for a, _ in out["results"]]
    busy = [a for a in answers if a.startswith("busy: ")]
    slowest = max(t for _, t in out["results"])
    page_max = max(t for _, t in out["pages"])
    print(f"\n{STORM_CLIENTS} clients at once: {answers.count('handshake')} conversation, {len(busy)} busy, "
          f"all answered "
          f"within {slowest:.2f} s; {PAGE_LOADS} page/info loads meanwhile, slowest {page_max:.2f} s; "
          f"storm {out['seconds']:.2f} s")
    assert answers.count("handshake") == 1 and len(busy) == STORM_CLIENTS - 1, answers
    assert set(busy) == {"busy: another conversation is in progress; try again later"}
    assert all(status == 200 for status, _ in out["pages"]) and page_max < 5.0, out["pages"]
    server.wait_idle()
    asyncio.run(a_clean_conversation(server.ws))  # and the next client has its conversation


# ------------------------------------------------------------------------------------------------
# Slowloris
# ------------------------------------------------------------------------------------------------

#: Connections that never finish a request, and those that never send a byte.
SLOW_CLIENTS = 100
SILENT_CLIENTS = 50


async def slowloris(server: LocalWeb, seconds: float) -> dict:
    host, port = server.http.split("//")[1].split(":")
    readers, writers = [], []
    for i in range(SLOW_CLIENTS + SILENT_CLIENTS):
        r, w = await asyncio.open_connection(host, int(port))
        if i < SLOW_CLIENTS:
            w.write(f"GET /?{i} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode())
        readers.append(r)
        writers.append(w)

    async def trickle() -> None:  # one more header line each, never the blank line that ends a request
        for n in range(int(seconds / 0.5)):
            for w in writers[:SLOW_CLIENTS]:
                if not w.is_closing():
                    w.write(f"X-{n}: {n}\r\n".encode())
            await asyncio.sleep(0.5)

    trickler = asyncio.ensure_future(trickle())
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with aiohttp.ClientSession() as session:
        async with session.get(server.http + "/") as r:
            status = r.status
            await r.read()
        page_s = loop.time() - t0
    t0 = loop.time()
    await a_clean_conversation(server.ws)
    chat_s = loop.time() - t0
    await trickler
    still_open = sum(not w.is_closing() for w in writers)
    # ... and the server lets them go once they have been idle for IDLE_CONNECTION_S (never finishing a request).
    readers = [asyncio.ensure_future(r.read()) for r in readers]
    t0 = loop.time()
    done, _ = await asyncio.wait(readers, timeout=IDLE_CONNECTION_S + 5)
    closed_s = loop.time() - t0
    for w in writers:
        w.close()
    return {"status": status, "page_s": page_s, "chat_s": chat_s, "open": still_open, "closed": len(done),
            "closed_s": closed_s + seconds}


def test_slowloris_does_not_block_others(server):
    server.wait_idle()
    out = asyncio.run(slowloris(server, seconds=3.0))
    print(f"\nslowloris: {SLOW_CLIENTS} unfinished requests + {SILENT_CLIENTS} silent connections: page in "
          f"{out['page_s']:.2f} s (HTTP {out['status']}), a conversation (handshake to Moshi's audio) in "
          f"{out['chat_s']:.2f} s; {out['open']} still open after 3 s, {out['closed']} closed by the server within "
          f"{out['closed_s']:.1f} s")
    assert out["status"] == 200 and out["page_s"] < 2.0, out
    assert out["chat_s"] < 20.0, out
    assert out["closed"] == SLOW_CLIENTS + SILENT_CLIENTS, out  # none is held for ever
    assert "Traceback" not in server.log
