"""`python -m moshi_mlx.local_web --demo` as a real process for a test: its URL, its log, its memory, and a wait
until it is free for the next conversation."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .audio_env import ROOT, base_env


class LocalWeb:
    """The demo server (``demo=False``: the model ``extra`` names) on an ephemeral port; stderr goes to ``log_path``
    (read with :attr:`log`)."""

    def __init__(
        self, log_path: Path, extra: list[str] = (), env: dict | None = None, timeout: float = 180, demo: bool = True
    ):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moshi_mlx.local_web", *(["--demo"] if demo else []), "--no-browser",
             "--host", "127.0.0.1", "--port", "0", *extra],
            cwd=ROOT, env=env or base_env(), stdout=subprocess.DEVNULL, stderr=self._log,
        )
        deadline = time.monotonic() + timeout
        self.http = ""
        while not self.http:
            m = re.search(r"open (https?://\S+)/ in your browser", self.log)
            if m:
                self.http = m.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"local_web did not start:\n{self.log}")
            else:
                time.sleep(0.1)
        self.ws = self.http.replace("http", "ws", 1) + "/api/chat"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def info(self, timeout: float = 5.0) -> dict:
        with urllib.request.urlopen(self.http + "/api/info", timeout=timeout) as r:
            return json.loads(r.read())

    def wait_idle(self, timeout: float = 15.0) -> float:
        """Seconds until /api/info says no conversation is active (AssertionError past ``timeout``)."""
        t0 = time.monotonic()
        while self.info()["busy"]:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"the server stayed busy for {timeout} s:\n{self.log[-2000:]}")
            time.sleep(0.02)
        return time.monotonic() - t0

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.log

    def __enter__(self) -> "LocalWeb":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
