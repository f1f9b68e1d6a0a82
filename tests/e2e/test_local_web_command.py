"""`python -m moshi_mlx.local_web` as a user runs it: it serves and stops on SIGTERM, and the failures
found before the model loads (a busy port, missing TLS files) are one plain line and exit code 1."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.web_server import expect_handshake

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MOSHI_MLX_DEMO_DIR", str(Path("~/.cache/moshi_mlx/demo").expanduser()))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moshi_mlx.local_web", "--demo", "--no-browser", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)


def test_busy_port_is_one_line_and_exit_1():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        r = _run("--host", "127.0.0.1", "--port", str(port))
    assert r.returncode == 1
    assert r.stderr == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (is another server running? try --port)\n"
    )


def test_missing_tls_files_are_one_line_and_exit_1():
    r = _run("--ssl", "/nonexistent", "--port", "0")
    assert r.returncode == 1
    assert r.stderr == (
        "error: --ssl /nonexistent: /nonexistent/cert.pem not found; create a self-signed pair with: openssl req "
        "-x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost -keyout /nonexistent/key.pem "
        "-out /nonexistent/cert.pem\n"
    )


@pytest.mark.asyncio
async def test_command_line_serves_and_stops():
    """`python -m moshi_mlx.local_web --demo` starts, serves the page and a conversation, stops on SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi_mlx.local_web", "--demo", "--no-browser", "--host", "127.0.0.1", "--port", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(),
    )
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stderr.readline)
            if not line:
                break
            lines.append(line)
            m = re.search(r"open (http://\S+/) in your browser", line)
            if m:
                url = m.group(1)
        assert url, "".join(lines)
        assert any("DEMO MODE" in ln for ln in lines)

        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                assert r.status == 200 and "app.js" in await r.text()
            async with s.ws_connect(url.replace("http", "ws") + "api/chat") as ws:
                await expect_handshake(ws)
        proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.to_thread(proc.communicate, timeout=30))[1]
        assert proc.returncode == 0, "".join(lines) + rest
        assert "server stopped" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
