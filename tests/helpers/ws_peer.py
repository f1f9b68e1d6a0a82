"""A bare aiohttp WebSocket endpoint on a real socket, serving any handler (a stand-in far end for the client)."""

from __future__ import annotations

from aiohttp import web  # noqa: E402


async def start_peer(handler, ssl_context=None) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/api/chat", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{port}"
