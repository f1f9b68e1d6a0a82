"""Kyutai's official web client (built, a test fixture outside this repository) against our server.

The client validates every 0x04 metadata message with its ``ServersInfoSchema`` and shows the result in
a "server info" panel. Served by our server (``--web-dir``), in headless Chromium with a fake
microphone, it must connect, stream, fill that panel and log no error at all. The same holds when
the client is hosted on another origin (a second local port, as Kyutai's own dev server would) and our
server is started with ``--allow-origin`` that origin; without the flag, its WebSocket gets 403.

The built client is looked for in ``shared/kyutai-official-client/dist`` beside the checkout (or any
folder above it), or in $MOSHI_MLX_OFFICIAL_CLIENT; the tests skip with a reason when it is absent.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from moshi_mlx.local_web import build_parser
from moshi_mlx.net import protocol
from moshi_mlx.server.app import ChatServer, create_app
from moshi_mlx.server.security import HostPolicy
from moshi_mlx.settings import EngineSettings
from tests.helpers.browser import ARTIFACTS, Browser
from tests.helpers.official_client import (
    PANEL_SHOWN,
    official_client_dir,
    open_and_connect,
    schema_problems,
)
from tests.helpers.web_server import Running, expect_handshake, receive, stop_server

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[2]


async def start(engine, web_dir: Path | None = None, **kwargs) -> Running:
    server = ChatServer(engine, description="test demo", demo=True, default_settings=EngineSettings(),
                        lm_model_file="none: random demo weights", **kwargs)
    runner = web.AppRunner(create_app(server, web_dir), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return Running(server, runner, site._server.sockets[0].getsockname()[1])


async def test_every_metadata_message_matches_kyutais_schema(engine):
    """Info and stats messages both carry the schema's fields, with the conversation's real settings."""
    running = await start(engine, stats_interval=0.2)
    try:
        query = "text_temperature=0.6&text_topk=20&audio_topk=100&pad_mult=0&repetition_penalty=1.0"
        async with aiohttp.ClientSession() as http, http.ws_connect(running.url(query=query)) as ws:
            await expect_handshake(ws)
            metas = []
            while len(metas) < 3:
                msg = protocol.decode((await receive(ws)).data)
                if msg is not None and msg.kind == protocol.Kind.METADATA:
                    metas.append(msg.json())
        assert [m["type"] for m in metas] == ["info", "stats", "stats"]
        for meta in metas:
            assert schema_problems(meta) == [], meta
            assert (meta["text_temperature"], meta["text_topk"], meta["audio_topk"]) == (0.6, 20, 100)
            assert meta["lm_model_file"] == "none: random demo weights" and meta["moshi_mlx_version"]
        info = metas[0]["build_info"]
        assert "moshi_mlx" in info["rustc_version"] and "Python" in info["rustc_version"]
        assert info["git_hash"] == "unknown" or len(info["git_hash"]) == 40
    finally:
        await stop_server(running)


@pytest.fixture(scope="module")
def official_client() -> Path:
    d = official_client_dir()
    if d is None:
        pytest.skip("Kyutai's built client not found (shared/kyutai-official-client/dist beside the checkout, "
                    "or set MOSHI_MLX_OFFICIAL_CLIENT)")
    return d


async def check_conversation(browser: Browser, running: Running, page_origin: str, screenshot: Path) -> None:
    """The server panel fills, audio flows both ways for a few seconds, and nothing is logged as an error."""
    panel = await browser.wait_for(PANEL_SHOWN, timeout=40)
    assert panel, f"no server panel; errors: {browser.errors[:5]}; console: {browser.console[-10:]}"
    conv = running.server.active
    # Keep talking for a few seconds: stats messages arrive every second and must parse too.
    await asyncio.sleep(5)
    text = await browser.eval("document.body.innerText")
    await browser.eval(  # the panel sits below the fold: show it in the screenshot
        "[...document.querySelectorAll('*')].find(e => !e.children.length && "
        "e.textContent.includes('Our server is running'))?.scrollIntoView()"
    )
    await browser.screenshot(screenshot)
    assert conv is not None and conv.frames_pushed > 10 and conv.bad_audio == 0
    assert conv.audio_frames_out > 5
    # The client decoded and played Moshi's voice (its decoder worker works under our headers).
    played = re.search(r"Audio played:\s*(\d+):(\d+(?:\.\d+)?)", text)
    assert played and 60 * int(played[1]) + float(played[2]) > 0.2, text[:1500]
    for label in ("Text temperature: 0.7", "Text topk: 25", "Pad mult:", "Repeat penalty:",
                  "LM model file: none: random demo weights", "Instance name: moshi_mlx"):
        assert label in text, (label, text[:1500])
    # The client itself styles its player with `url(${imageUrl})` while imageUrl is undefined (not in
    # image mode), so the browser fetches /undefined from the page's own origin whatever the server:
    # that 404 is not ours.
    own_quirk = f"{page_origin}/undefined"
    errors = [e for e in browser.errors if not (e.startswith("network:") and e.endswith(own_quirk))]
    assert errors == [], json.dumps(errors[:5], indent=1)[:3000]


async def test_official_client_served_by_us(chromium, engine, mic_wav, official_client):  # noqa: F811
    running = await start(engine, official_client)
    browser = await Browser(chromium, mic_wav).start()
    try:
        origin = f"http://127.0.0.1:{running.port}"
        await open_and_connect(browser, f"{origin}/?worker_addr=127.0.0.1:{running.port}")
        await check_conversation(browser, running, origin, ARTIFACTS / "official_client.png")
    finally:
        await browser.close()
        await stop_server(running)


# ------------------------------------------------------------------------------------------------
# The client hosted on another origin (as from Kyutai's own dev server), talking to our server
# ------------------------------------------------------------------------------------------------


class StaticSite:
    """A plain static file server for the built client on its own port: the "other origin"."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _file(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"] or "index.html"
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def start(self) -> "StaticSite":
        app = web.Application()
        app.router.add_get("/{path:.*}", self._file)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest_asyncio.fixture
async def other_origin(official_client):
    site = await StaticSite(official_client).start()
    yield site
    await site.close()


def policy_from_command_line(*argv: str) -> HostPolicy:
    """The Host/Origin policy exactly as ``local_web`` builds it from its command line."""
    args = build_parser().parse_args(["--host", "127.0.0.1", *argv])
    return HostPolicy(args.host, args.allow_origin)


async def test_official_client_from_another_origin(chromium, engine, mic_wav, other_origin):  # noqa: F811
    """Served from a second port, the client connects to a server started with --allow-origin."""
    running = await start(engine, policy=policy_from_command_line("--allow-origin", other_origin.origin))
    browser = await Browser(chromium, mic_wav).start()
    try:
        await open_and_connect(browser, f"{other_origin.origin}/?worker_addr=127.0.0.1:{running.port}")
        await check_conversation(browser, running, other_origin.origin,
                                 ARTIFACTS / "official_client_cross_origin.png")
        assert running.server.conversations == 1
    finally:
        await browser.close()
        await stop_server(running)


async def test_official_client_from_another_origin_refused_by_default(chromium, engine, mic_wav, other_origin):  # noqa: F811
    """Without --allow-origin the WebSocket handshake gets 403, and the client shows it is disconnected."""
    running = await start(engine, policy=policy_from_command_line())
    browser = await Browser(chromium, mic_wav).start()
    try:
        await open_and_connect(browser, f"{other_origin.origin}/?worker_addr=127.0.0.1:{running.port}")
        # On the socket's close the client offers "Start Over" instead of Connect, its dot stays red.
        start_over = "[...document.querySelectorAll('button')].some(b => b.textContent.trim() === 'Start Over')"
        assert await browser.wait_for(start_over, timeout=30), browser.console[-10:]
        await asyncio.sleep(1)  # the panel would need a handshake and a metadata message
        assert not await browser.eval(PANEL_SHOWN)
        assert await browser.eval("!!document.querySelector('.bg-red-700') && !document.querySelector('.bg-green-700')")
        await browser.screenshot(ARTIFACTS / "official_client_cross_origin_refused.png")
        refused = [e for e in browser.errors if f"127.0.0.1:{running.port}/api/chat" in e and "403" in e]
        assert refused, browser.errors
        assert running.server.conversations == 0 and running.server.active is None
    finally:
        await browser.close()
        await stop_server(running)
