"""The web server's memory: idle, during conversations, and after each one ends (does anything stay behind?).

    python benchmarks/bench_web_memory.py                          # demo server, 3 conversations of 60 s
    python benchmarks/bench_web_memory.py --conversations 5 --seconds 120
    python benchmarks/bench_web_memory.py --server-args -q 4 --max-memory 5.2    # a real model

Starts ``python -m moshi_mlx.local_web`` (``--demo`` unless --server-args say otherwise) on a free port,
then talks to it with the real client path (:class:`moshi_mlx.net.remote.RemoteConversation`: Opus over the
WebSocket) at the microphone's 80 ms pace, one conversation after another. The server's resident set
(psutil) is sampled every second. Prints a table on stderr and JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshi_mlx.audio.frames import FRAME_S, FRAME_SIZE, SAMPLE_RATE  # noqa: E402
from moshi_mlx.net.remote import RemoteConversation  # noqa: E402


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    args = extra or ["--demo"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "moshi_mlx.local_web", *args, "--no-browser", "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        print(f"server: {line.rstrip()}", file=sys.stderr)
        m = re.search(r"open (http://\S+/) in your browser", line)
        if m:
            # Keep draining the server's log so it never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("the server did not start (see its log above)")


class Sampler:
    """The server's RSS once a second, on a thread."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append((time.monotonic(), self.process.memory_info().rss))

    def now(self) -> int:
        return int(self.process.memory_info().rss)

    def peak_since(self, t: float) -> int:
        return max((r for ts, r in self.samples if ts >= t), default=self.now())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


async def converse(url: str, seconds: float) -> dict:
    conv = RemoteConversation(url, on_audio=lambda f: None)  # http://host:port/ -> ws://host:port/api/chat
    await conv.connect()
    run = asyncio.ensure_future(conv.run())
    t = np.arange(FRAME_SIZE) / SAMPLE_RATE
    done = threading.Event()

    def mic() -> None:  # PortAudio's role: one frame every 80 ms from its own thread
        nxt = time.monotonic()
        for i in range(int(seconds / FRAME_S)):
            conv.push_mic((0.3 * np.sin(2 * np.pi * (200 + i % 50) * t)).astype(np.float32))
            nxt += FRAME_S
            time.sleep(max(0.0, nxt - time.monotonic()))
        done.set()

    threading.Thread(target=mic, daemon=True).start()
    while not done.is_set():
        await asyncio.sleep(0.1)
    await conv.close()
    await asyncio.wait({run}, timeout=5)
    return {"frames_sent": conv.stats.frames_sent, "frames_received": conv.stats.frames_received}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--seconds", type=float, default=60.0, help="length of each conversation (default 60)")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="the server's flags (default --demo)")
    args = p.parse_args()
    proc, url = start_server(args.server_args)
    sampler = Sampler(proc.pid)
    try:
        time.sleep(3.0)
        idle = sampler.now()
        rows = []
        for k in range(args.conversations):
            start = time.monotonic()
            counts = asyncio.run(converse(url, args.seconds))
            time.sleep(3.0)  # the server closes the session and frees it
            rows.append({"conversation": k + 1, **counts, "rss_peak_mb": round(sampler.peak_since(start) / 1e6, 1),
                         "rss_after_mb": round(sampler.now() / 1e6, 1)})
    finally:
        sampler.stop()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = {"server": args.server_args or ["--demo"], "seconds": args.seconds, "rss_idle_mb": round(idle / 1e6, 1),
           "conversations": rows,
           "rss_after_growth_mb": round(rows[-1]["rss_after_mb"] - rows[0]["rss_after_mb"], 1) if rows else None}
    print(f"server idle: RSS {out['rss_idle_mb']:.1f} MB", file=sys.stderr)
    print(f"{'#':>3} {'frames sent':>11} {'received':>9} {'RSS peak MB':>11} {'RSS after MB':>12}", file=sys.stderr)
    for r in rows:
        print(f"{r['conversation']:>3} {r['frames_sent']:>11} {r['frames_received']:>9} {r['rss_peak_mb']:>11.1f} "
              f"{r['rss_after_mb']:>12.1f}", file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
