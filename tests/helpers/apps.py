"""The terminal app (`python -m moshi_mlx.local` / `client`) as a real process on virtual devices, and readers of what it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .audio_env import (
    ROOT,
    JackServer,
)

FRAME_S = 0.08


class App:
    """The app as a child process; stdout/stderr are read as they come, with arrival times."""

    def __init__(self, args: list[str], env: dict, prelude: str | None = None, module: str = "moshi_mlx.local"):
        code = (prelude or "") + (
            f"\nimport sys; sys.argv = ['{module}'] + sys.argv[1:]\nfrom {module} import console_main; console_main()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(pipe, sink):
        while True:
            chunk = os.read(pipe.fileno(), 4096)
            if not chunk:
                return
            sink.append((time.monotonic(), chunk.decode(errors="replace")))

    @property
    def stdout(self) -> str:
        return "".join(c for _, c in self.out)

    @property
    def stderr(self) -> str:
        return "".join(c for _, c in self.err)

    def interrupt(self, timeout: float = 10.0) -> float:
        """SIGINT; returns the seconds until the process was gone."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout)
        elapsed = time.monotonic() - t0
        for t in self._threads:
            t.join(5)
        return elapsed

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


#: The summary line each terminal command ends with, as (pattern, field names).
LOCAL_SUMMARY = (
    r"session: ([\d.]+) s, (\d+) frames in, (\d+) answered, (\d+) dropped \(([\d.]+) s\), (\d+) underruns",
    ["seconds", "frames_in", "answered", "dropped", "dropped_s", "underruns"],
)
CLIENT_SUMMARY = (
    r"session: ([\d.]+) s, (\d+) connection\(s\), (\d+) frames sent, (\d+) received, (\d+) dropped here "
    r"\([\d.]+ s\), (\d+) underruns",
    ["seconds", "connections", "sent", "received", "dropped", "underruns"],
)
LATENCY = r"(?:, latency median (\d+) ms / max (\d+) ms)?"


def session_summary(stderr: str, summary: tuple[str, list[str]] = LOCAL_SUMMARY) -> dict:
    """The numbers of the summary line (`local` by default, `CLIENT_SUMMARY` for the client), latency if given."""
    pattern, keys = summary
    m = re.search(pattern + LATENCY, stderr)
    assert m, stderr
    return {k: float(v) if v is not None else None for k, v in zip([*keys, "lat_median", "lat_max"], m.groups())}


def status_lines(stderr: str) -> list[dict]:
    return [
        {"lag": int(a), "dropped": int(b), "underruns": int(c)}
        for a, b, c in re.findall(r"\[status\] lag +(\d+) ms \| dropped (\d+) \| underruns (\d+)", stderr)
    ]


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr


def talk(jack: JackServer, app: App, speech: Path, record: Path, seconds: float, rate: int) -> float:
    """Wait for the app's streams, record its speaker, play speech into its mic; returns the app's start time."""
    assert jack.wait_for_port("PortAudio:in_0", 90), app.stderr
    started = time.monotonic()
    jack.disconnect("system:capture_1", "PortAudio:in_0")
    rec = jack.record("PortAudio:out_0", record, seconds)
    jack.play_into(speech, "PortAudio:in_0")
    rc = rec.wait(seconds + 30)
    head = record.read_bytes()[:64] if record.exists() else b"(missing)"
    size = record.stat().st_size if record.exists() else 0
    assert rc == 0 and size > rate * seconds, f"jack-record rc {rc}, {size} bytes, header {head!r}\n{app.stderr}"
    return started
