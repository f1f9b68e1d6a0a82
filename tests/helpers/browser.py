"""Headless Chromium driven over the DevTools Protocol (a minimal client), and where its screenshots go."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


ARTIFACTS = ROOT / "artifacts"


def chromium_path() -> str | None:
    env = os.environ.get("MOSHI_MLX_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


class Browser:
    """Headless Chromium with a fake microphone, driven over the DevTools protocol."""

    def __init__(self, binary: str, mic_wav: Path, allow_mic: bool = True, profile: str | None = None):
        """``profile``: a user-data folder to reuse (what a crashed browser left, its IndexedDB included)."""
        self.binary, self.mic_wav, self.allow_mic = binary, mic_wav, allow_mic
        self.profile = profile or tempfile.mkdtemp(prefix="moshi-chromium-")
        self.proc: subprocess.Popen | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws = None
        self._next = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []
        self.errors: list[str] = []  # console.error, uncaught exceptions, failed loads (Log domain)
        self._reader: asyncio.Task | None = None

    async def start(self) -> "Browser":
        self.proc = subprocess.Popen(
            [
                self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                *(["--use-fake-ui-for-media-stream"] if self.allow_mic else []),
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={self.mic_wav}",
                "--autoplay-policy=no-user-gesture-required", "--window-size=900,1000", "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while True:
            if port_file.exists() and len(port_file.read_text().split()) >= 2:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit code {self.proc.poll()})")
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        self.http = aiohttp.ClientSession()
        targets = await (await self.http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        await self.call("Log.enable")
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                line = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
                self.console.append(line)
                if data["params"].get("type") in ("error", "assert"):
                    self.errors.append(line)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("EXCEPTION " + json.dumps(data["params"]["exceptionDetails"])[:500])
                self.errors.append(self.console[-1])
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"].get("level") == "error":
                entry = data["params"]["entry"]
                self.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")

    async def call(self, method: str, **params):
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        await self.ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, 30)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data["result"]

    async def eval(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await self.eval(expression):
                    return True
            except RuntimeError:
                pass  # page still loading
            await asyncio.sleep(0.25)
        return False

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def crash(self) -> str:
        """SIGKILL the browser, as a crash or a dead battery would; returns its profile folder (kept)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.cancel()
        if self.http is not None:
            await self.http.close()
        self.proc = self.ws = self.http = self._reader = None
        (Path(self.profile) / "DevToolsActivePort").unlink(missing_ok=True)  # the next start waits for a fresh one
        return self.profile

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)
