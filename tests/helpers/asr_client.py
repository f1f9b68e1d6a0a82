"""A client of Kyutai's STT WebSocket (`/api/asr-streaming`), written from Kyutai's Rust server and its scripts
(delayed-streams-modeling `stt_from_file_rust_server.py`): audio in 80 ms Audio messages (optionally paced at
real time), then a Marker, then silence until the Marker comes back. Every message received is kept with the
time it arrived, and every chunk sent with the time it left, so tests can measure latency.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from moshi_mlx.audio.frames import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.net import asr_protocol as asr


@dataclass
class AsrRun:
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (perf_counter, message)
    sent: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, samples sent so far)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.received if m["type"] == kind]

    def words(self) -> list[tuple[str, float, float | None]]:
        """(text, start, stop) as Kyutai's script pairs them: an EndWord closes the last Word."""
        out: list[list[Any]] = []
        for _, m in self.received:
            if m["type"] == "Word":
                out.append([m["text"], m["start_time"], None])
            elif m["type"] == "EndWord" and out:
                out[-1][2] = m["stop_time"]
        return [tuple(w) for w in out]  # type: ignore[misc]

    def sent_at(self, seconds: float) -> float:
        """When the chunk holding the client's audio at `seconds` left."""
        sample = int(seconds * SAMPLE_RATE)
        for when, total in self.sent:
            if total > sample:
                return when
        return self.sent[-1][0]


async def stream(
    url: str, pcm: np.ndarray, *, rtf: float | None = None, marker_id: int = 7, tail_silence_s: float = 2.0,
    api_key: str = "public_token", timeout: float = 60.0,
) -> AsrRun:
    """Send `pcm` (24 kHz) to `url` at `rtf` x real time (None: as fast as the server reads), then the marker,
    then silence in 80 ms chunks until the marker comes back (at most `tail_silence_s`)."""
    run = AsrRun()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers={asr.API_KEY_HEADER: api_key}) as ws:
            done = asyncio.Event()

            async def receive() -> None:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    parsed = asr.unpack_out(msg.data)
                    run.received.append((time.perf_counter(), parsed))
                    if parsed["type"] == "Marker" and parsed["id"] == marker_id:
                        done.set()
                        return

            async def send() -> None:
                start, total = time.perf_counter(), 0
                for i in range(0, len(pcm), FRAME_SIZE):
                    chunk = pcm[i: i + FRAME_SIZE]
                    await ws.send_bytes(asr.pack_audio(chunk))
                    total += len(chunk)
                    run.sent.append((time.perf_counter(), total))
                    if rtf is not None:
                        await asyncio.sleep(max(0.0, start + total / SAMPLE_RATE / rtf - time.perf_counter()))
                await ws.send_bytes(asr.pack_marker(marker_id))
                silence = np.zeros(FRAME_SIZE, np.float32)
                for _ in range(int(tail_silence_s * SAMPLE_RATE / FRAME_SIZE)):
                    if done.is_set():
                        return
                    await ws.send_bytes(asr.pack_audio(silence))
                    if rtf is not None:
                        await asyncio.sleep(FRAME_SIZE / SAMPLE_RATE / rtf)

            receiver = asyncio.create_task(receive())
            await send()
            await asyncio.wait_for(receiver, timeout)
    return run
