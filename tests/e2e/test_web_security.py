"""The web server's Host/Origin rules, headers, served files and limits, against a real aiohttp
server with crafted raw requests (moshi_mlx.server.security and its use in moshi_mlx.server.app)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from moshi_mlx.local_web import build_parser
from moshi_mlx.net import protocol
from moshi_mlx.server.app import ChatServer, create_app, find_web_dir
from moshi_mlx.server.security import HostPolicy
from moshi_mlx.settings import EngineSettings
from tests.helpers.web_server import (
    Running,
    expect_handshake,
    stop_server,
    until_closed,
)

pytestmark = pytest.mark.asyncio

HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options", "server")


def _official_client() -> Path | None:
    """Kyutai's built client (a test fixture in the team's shared folder, found above the checkout)."""
    if os.environ.get("MOSHI_MLX_OFFICIAL_CLIENT"):
        return Path(os.environ["MOSHI_MLX_OFFICIAL_CLIENT"])
    for parent in Path(__file__).resolve().parents:
        d = parent / "shared" / "kyutai-official-client" / "dist"
        if (d / "index.html").is_file():
            return d
    return None


async def start(engine, web_dir: Path | None = None, policy: HostPolicy | None = None) -> Running:
    server = ChatServer(engine, description="test demo", demo=True, default_settings=EngineSettings(), policy=policy)
    runner = web.AppRunner(create_app(server, web_dir), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return Running(server, runner, site._server.sockets[0].getsockname()[1])


@pytest_asyncio.fixture
async def srv(engine):
    running = await start(engine)
    yield running
    await stop_server(running)


async def raw(port: int, request: bytes, read_limit: int = 1 << 20) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; returns the status, the headers (lower-case names) and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if status != 101:
        n = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(n), 10) if n else b""
    writer.close()
    return status, headers, body


def get(path: str, host: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


def upgrade(host: str, origin: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extra = (
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        + (f"Origin: {origin}\r\n" if origin else "")
    )
    return f"GET /api/chat HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


# ------------------------------------------------------------------------------------------------
# Host and Origin
# ------------------------------------------------------------------------------------------------


async def test_dns_rebinding_host_is_refused(srv):
    p = srv.port
    for host in (f"evil.example:{p}", "evil.example", f"10.1.2.3:{p}", f"localhost.evil.example:{p}", "bad:port:x"):
        for req in (get("/api/info", host), get("/", host), upgrade(host, f"http://{host}")):
            status, headers, _ = await raw(p, req)
            assert status == 403, (host, req[:20])
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
    for host in (f"localhost:{p}", f"127.0.0.1:{p}", f"[::1]:{p}", f"LocalHost:{p}", f"app.localhost:{p}", "127.0.0.1"):
        status, _, body = await raw(p, get("/api/info", host))
        assert status == 200 and b'"server": "moshi_mlx"' in body, host
    assert srv.server.conversations == 0  # nothing refused ever reached the WebSocket handler


async def test_origin_must_match_scheme_host_and_port(srv):
    p = srv.port
    host = f"127.0.0.1:{p}"
    for origin in (f"http://127.0.0.1:{p + 1}", f"https://127.0.0.1:{p}", "http://127.0.0.1", f"http://localhost:{p}",
                   "null", "http://evil.example"):
        status, _, _ = await raw(p, upgrade(host, origin))
        assert status == 403, origin
    status, _, _ = await raw(p, upgrade(host, f"http://127.0.0.1:{p}"))
    assert status == 101


async def test_allow_origin_lets_another_origin_in(engine):
    running = await start(engine, policy=HostPolicy("localhost", ["http://localhost:5173", "https://ui.example"]))
    try:
        p = running.port
        status, _, _ = await raw(p, upgrade(f"localhost:{p}", "http://localhost:5173"))
        assert status == 101
        await asyncio.sleep(0.5)
        for origin in ("http://localhost:5174", "http://ui.example", "https://ui.example:444"):
            status, _, _ = await raw(p, upgrade(f"localhost:{p}", origin))
            assert status == 403, origin
        # The allowed origin's host is an allowed Host too; its page may read /api/info.
        status, headers, _ = await raw(p, get("/api/info", f"ui.example:{p}", "Origin: https://ui.example\r\n"))
        assert status == 200 and headers["access-control-allow-origin"] == "https://ui.example"
        status, headers, _ = await raw(p, get("/api/info", f"localhost:{p}", "Origin: http://evil.example\r\n"))
        assert status == 200 and "access-control-allow-origin" not in headers
    finally:
        await stop_server(running)


async def test_policy_rules():
    lan = HostPolicy("0.0.0.0")
    assert lan.host_ok("192.168.1.20:8998") and lan.host_ok("[fe80::1]:8998") and not lan.host_ok("evil.example")
    named = HostPolicy("mymac.lan")
    assert named.host_ok("mymac.lan:8998") and not named.host_ok("192.168.1.20") and named.host_ok("[::1]:1")
    with pytest.raises(ValueError):
        HostPolicy("localhost", ["localhost:5173"])


async def test_allow_origin_flag():
    args = build_parser().parse_args(["--allow-origin", "http://localhost:5173", "--allow-origin", "https://a.b"])
    assert args.allow_origin == ["http://localhost:5173", "https://a.b"]
    assert build_parser().parse_args([]).allow_origin == []
    for bad in ("localhost:5173", "http://a.b/path", "ftp://a.b", "*"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--allow-origin", bad])


# ------------------------------------------------------------------------------------------------
# Headers and files
# ------------------------------------------------------------------------------------------------


async def test_security_headers_on_every_response(srv):
    p = srv.port
    host = f"127.0.0.1:{p}"
    for req, want in [
        (get("/", host), 200), (get("/app.js", host), 200), (get("/vendor/encoderWorker.min.js", host), 200),
        (get("/api/info", host), 200), (get("/nope.js", host), 404), (get("/README.md", host), 404),
        (get("/", "evil.example"), 403), (upgrade(host, None), 101),
    ]:
        status, h, _ = await raw(p, req)
        assert status == want, req[:30]
        assert all(k in h for k in HEADERS), (req[:30], h)
        csp = h["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self' 'wasm-unsafe-eval'" in csp
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp and "'unsafe-eval'" not in csp
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY"
        assert h["server"] == "moshi_mlx" and not re.search(r"python|aiohttp|\d+\.\d+", h["server"], re.I)
    _, h, _ = await raw(p, get("/app.js", host))
    assert "javascript" in h["content-type"]


async def _worker_eval(port: int) -> dict[str, bool]:
    """For each Sec-Fetch-Dest, whether the CSP sent with a script lets it eval."""
    host = f"127.0.0.1:{port}"
    found = {}
    for dest in ("worker", "sharedworker", "script", "document", ""):
        extra = f"Sec-Fetch-Dest: {dest}\r\n" if dest else ""
        status, h, _ = await raw(port, get("/vendor/encoderWorker.min.js", host, extra))
        csp = h["content-security-policy"]
        assert status == 200 and "script-src 'self' 'wasm-unsafe-eval'" in csp, dest
        assert "default-src 'self'" in csp and "object-src 'none'" in csp
        found[dest] = "'unsafe-eval'" in csp
    return found


async def test_worker_scripts_of_a_foreign_ui_alone_may_eval(srv, engine, tmp_path):
    """A worker runs under the policy sent with its own script. Our UI never gets eval; a foreign one
    (--web-dir, e.g. Kyutai's client, whose decoder worker needs it) gets it for worker scripts only."""
    assert not any((await _worker_eval(srv.port)).values())
    foreign = tmp_path / "web"
    shutil.copytree(find_web_dir(), foreign)
    running = await start(engine, foreign)
    try:
        assert await _worker_eval(running.port) == {
            "worker": True, "sharedworker": True, "script": False, "document": False, "": False,
        }
    finally:
        await stop_server(running)


async def test_only_the_ui_files_are_served(engine, tmp_path):
    web_dir = tmp_path / "web"
    shutil.copytree(find_web_dir(), web_dir)
    (web_dir / "favicon.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (web_dir / "extra.js").write_text("export {};\n")
    (web_dir / ".env").write_text("SECRET=1\n")
    (tmp_path / "outside.js").write_text("secret\n")
    (web_dir / "leak.js").symlink_to(tmp_path / "outside.js")
    (web_dir / "scripts").mkdir(exist_ok=True)
    (web_dir / "scripts" / "build.js").write_text("node only\n")
    running = await start(engine, web_dir)
    try:
        host = f"127.0.0.1:{running.port}"
        served = ["/", "/index.html", "/app.js", "/audio-worklets.js", "/style.css", "/favicon.svg", "/extra.js",
                  "/vendor/ogg-opus-decoder.min.js", "/vendor/encoderWorker.min.js"]
        served += [f"/vendor/LICENSES/{f.name}" for f in (web_dir / "vendor" / "LICENSES").iterdir()]
        hidden = ["/README.md", "/package.json", "/package-lock.json", "/scripts/vendor.mjs", "/scripts/build.js",
                  "/vendor/MANIFEST.json", "/.env", "/leak.js", "/%2e%2e/outside.js", "/vendor/../README.md",
                  "/vendor/LICENSES/../../package.json", "/web/app.js"]
        for path in served:
            status, _, body = await raw(running.port, get(path, host))
            assert status == 200 and body, path
        for path in hidden:
            status, _, body = await raw(running.port, get(path, host))
            assert status in (400, 404), path
            assert b"SECRET" not in body and b"secret" not in body and b'"name"' not in body
    finally:
        await stop_server(running)


async def test_official_client_is_served_with_web_dir(engine):
    dist = _official_client()
    if dist is None:
        pytest.skip("Kyutai's built client not found (set MOSHI_MLX_OFFICIAL_CLIENT to its dist/ folder)")
    running = await start(engine, dist)
    try:
        host = f"localhost:{running.port}"
        status, _, index = await raw(running.port, get("/", host))
        assert status == 200
        refs = re.findall(r'(?:src|href)="(/[^"]+)"', index.decode())
        files = ["/" + str(p.relative_to(dist)) for p in (dist / "assets").iterdir() if p.is_file()]
        assert refs and files
        for path in set(refs) | set(files):
            if not (dist / path.lstrip("/")).is_file():
                continue  # index.html names favicons the build does not ship
            status, h, body = await raw(running.port, get(path, host), read_limit=1 << 24)
            assert status == 200 and body, path
            if path.endswith(".wasm"):
                assert h["content-type"] == "application/wasm"
        status, _, _ = await raw(running.port, upgrade(host, f"http://{host}"))
        assert status == 101
    finally:
        await stop_server(running)


# ------------------------------------------------------------------------------------------------
# Limits and malformed requests
# ------------------------------------------------------------------------------------------------


async def test_message_over_the_transport_limit_gets_an_error_first(srv):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(srv.url()) as ws:
            await expect_handshake(ws)
            await ws.send_bytes(b"\x01" + bytes(2 * 1024 * 1024))
            messages = await until_closed(ws)
    errors = [m.text for m in messages if m.kind == protocol.Kind.ERROR]
    assert any("larger than the limit of 262144" in e and "1048576" in e for e in errors), errors


async def test_malformed_http_is_answered_without_traceback(srv, caplog):
    caplog.set_level(logging.DEBUG)
    p = srv.port
    host = f"127.0.0.1:{p}"
    for req in (
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n",  # TLS to an http port
        b"GARBAGE\r\n\r\n",
    ):
        status, h, _ = await raw(p, req)
        assert 400 <= status < 500, req[:20]
        assert "python" not in h.get("server", "").lower() and "aiohttp" not in h.get("server", "").lower()
    await asyncio.sleep(0.2)
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records), caplog.text
    status, _, _ = await raw(p, get("/api/info", host))  # still serving
    assert status == 200
