"""Fuzzing the remote client against a stand-in server on a real socket (hypothesis, bounded: see
tests/helpers/fuzz.py): the server's first messages are random (any kind, text frames, HTTP refusals of the
upgrade), then random messages follow. `RemoteConversation.connect` gives a handshake or one ClientError line;
after a handshake the conversation takes whatever comes until the server hangs up, and says so in one line.
(The message handling alone, in process: tests/unit/net/test_fuzz_parsers.py.)"""

from __future__ import annotations

import asyncio

from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from moshi_mlx.net import protocol
from moshi_mlx.net.failures import ClientError
from moshi_mlx.net.remote import RemoteConversation
from tests.helpers.fuzz import MESSAGES, SERVER_EXAMPLES, fuzz_settings
from tests.helpers.ws_peer import start_peer

#: What the stand-in does first: refuse the upgrade with an HTTP status, or accept and send these.
OPENINGS = st.one_of(
    st.sampled_from([400, 403, 404, 500, 503]).map(lambda status: ("http", status)),
    st.one_of(st.just([]), st.lists(  # half the time a plain handshake first: the conversation then takes the rest
        st.one_of(MESSAGES.map(lambda m: ("bytes", m)), st.text(max_size=20).map(lambda t: ("text", t))), max_size=3,
    )).map(lambda first: ("ws", first)),
)


async def _exchange(opening, then: list[bytes]) -> tuple[str, list[str]]:
    async def handler(request):
        kind, what = opening
        if kind == "http":
            return web.Response(status=what, text="no")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for how, data in what:
            await (ws.send_bytes(data) if how == "bytes" else ws.send_str(data))
        await ws.send_bytes(protocol.encode_handshake())  # if nothing before it ended the client's wait
        for data in then:
            await ws.send_bytes(data)
        await asyncio.sleep(0.05)
        await ws.close()
        return ws

    runner, url = await start_peer(handler)
    notices: list[str] = []
    conv = RemoteConversation(f"{url}/api/chat", on_audio=lambda f: None, on_notice=notices.append,
                              connect_timeout=5, handshake_timeout=5)
    try:
        try:
            await conv.connect()
        except ClientError as e:
            return f"refused: {e}", notices
        try:
            await asyncio.wait_for(conv.run(), 10)
        except ClientError as e:
            return f"ended: {e}", notices
        return "ended quietly", notices
    finally:
        await conv.close()
        await runner.cleanup()


@fuzz_settings(SERVER_EXAMPLES)
@given(OPENINGS, st.lists(MESSAGES, max_size=6))
def test_the_client_meets_any_server_with_one_line(opening, then):
    outcome, notices = asyncio.run(_exchange(opening, then))
    for line in [outcome, *notices]:
        assert line and "\n" not in line and "Traceback" not in line, line
    if opening[0] == "http":
        assert outcome.startswith("refused: "), outcome
    else:
        assert outcome.startswith(("refused: ", "ended: ")), outcome  # the stand-in always hangs up at the end
