"""Added latency of the terminal client's path: mic frame in -> Moshi's frame out, over loopback.

    python benchmarks/bench_client.py                 # echo server on 127.0.0.1, ws
    python benchmarks/bench_client.py --tls           # the same over wss (self-signed, like --ssl auto)
    python benchmarks/bench_client.py --url ws://127.0.0.1:8998 --frames 200   # a real server (model included)

The client side is the real one (:class:`moshi_mlx.net.remote.RemoteConversation`: Opus encode, WebSocket,
Opus decode, re-chunking); frames are pushed at the microphone's real 80 ms pace from a thread, as
PortAudio does. The built-in server is an echo in its own process (it decodes the client's Opus and
sends each frame back re-encoded, with no model), so the figure is what the client path and the
protocol add on top of the model's own time. Prints a table and JSON (``--json PATH`` writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshi_mlx.audio.frames import FRAME_S, FRAME_SIZE, SAMPLE_RATE  # noqa: E402
from moshi_mlx.net import protocol  # noqa: E402
from moshi_mlx.net.remote import RemoteConversation  # noqa: E402


def _echo_server(port_out, tls_dir: str | None) -> None:
    """Child process: an aiohttp echo server speaking the protocol (handshake, audio back frame by frame)."""
    from aiohttp import WSMsgType, web

    from moshi_mlx.net.opus import OpusFrames

    async def chat(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(protocol.encode_handshake())
        opus = OpusFrames()
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                continue
            m = protocol.decode(msg.data)
            if m is not None and m.kind == protocol.Kind.AUDIO:
                for frame in opus.decode(m.payload):
                    await ws.send_bytes(protocol.encode_audio(opus.encode(frame)))
        return ws

    async def main():
        ctx = None
        if tls_dir:
            from moshi_mlx.net import tls

            info = tls.ensure_certificate(tls_dir, names=["localhost"], addresses=["127.0.0.1"])
            ctx = tls.server_context(info.cert, info.key)
        app = web.Application()
        app.router.add_get("/api/chat", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port_out.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


async def measure(url: str, frames: int, insecure: bool) -> dict:
    from moshi_mlx.net.tls import client_context

    received = threading.Event()
    conv = RemoteConversation(
        url, on_audio=lambda f: None, ssl_context=client_context(insecure=insecure) if url.startswith("wss") else None,
    )
    t0 = time.perf_counter()
    await conv.connect()
    connect_ms = (time.perf_counter() - t0) * 1e3
    run = asyncio.ensure_future(conv.run())
    t = np.arange(FRAME_SIZE) / SAMPLE_RATE

    def mic() -> None:  # PortAudio's role: one frame every 80 ms, on its own thread
        nxt = time.monotonic()
        for i in range(frames):
            conv.push_mic((0.3 * np.sin(2 * np.pi * (200 + i % 50) * t)).astype(np.float32))
            nxt += FRAME_S
            time.sleep(max(0.0, nxt - time.monotonic()))
        received.set()

    th = threading.Thread(target=mic, daemon=True)
    th.start()
    while not received.is_set():
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 5.0  # the last answers still in flight
    while conv.stats.frames_received < conv.stats.frames_sent - 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await conv.close()
    await asyncio.wait({run}, timeout=5)
    lat = list(conv.stats.latencies_ms)
    steady = lat[5:]  # the first frames include the codec's start-up
    return {
        "url": url.split("?")[0],
        "frames_pushed": frames,
        "frames_sent": conv.stats.frames_sent,
        "frames_received": conv.stats.frames_received,
        "frames_dropped": conv.stats.frames_dropped,
        "connect_ms": round(connect_ms, 1),
        "latency_ms": {
            "median": round(statistics.median(steady), 2),
            "p90": round(float(np.percentile(steady, 90)), 2),
            "max": round(max(steady), 2),
            "min": round(min(lat), 2),
        } if steady else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="measure against this server instead of the built-in echo")
    p.add_argument("--tls", action="store_true", help="built-in echo over wss with a self-signed certificate")
    p.add_argument("--insecure", action="store_true", help="with --url wss://...: accept its certificate")
    p.add_argument("--frames", type=int, default=100, help="80 ms frames to send (default 100: 8 s)")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args()
    proc = None
    url = args.url
    if url is None:
        q: mp.Queue = mp.get_context("spawn").Queue()
        tls_dir = tempfile.mkdtemp() if args.tls else None
        proc = mp.get_context("spawn").Process(target=_echo_server, args=(q, tls_dir), daemon=True)
        proc.start()
        url = f"{'wss' if args.tls else 'ws'}://127.0.0.1:{q.get(timeout=60)}"
    try:
        result = asyncio.run(measure(url, args.frames, args.insecure or args.tls))
    finally:
        if proc is not None:
            proc.terminate()
            proc.join(5)
    result["server"] = "echo (no model), own process" if args.url is None else "given"
    result["machine"] = {"os": platform.platform(), "python": platform.python_version(), "cpu": platform.processor()}
    lat = result["latency_ms"] or {}
    print(json.dumps(result, indent=2))
    print()
    print("| path | frames sent/received/dropped | connect | latency median | p90 | max |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['url']} ({result['server']}) | {result['frames_sent']}/{result['frames_received']}/"
          f"{result['frames_dropped']} | {result['connect_ms']} ms | {lat.get('median')} ms | {lat.get('p90')} ms | "
          f"{lat.get('max')} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
