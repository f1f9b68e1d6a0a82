"""The audio format every part of the app shares, defined once, and the one PCM re-chunker.

Mimi codes 24 kHz mono audio at 12.5 frames per second: everything else is derived from those two facts.
Pure numpy (and soxr for resampling): the wire protocol and the audio callbacks import this, never MLX.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 24_000  # Hz, Mimi's rate
FRAME_RATE = 12.5  # Mimi frames per second
FRAME_SIZE = int(SAMPLE_RATE / FRAME_RATE)  # 1920 samples
FRAME_MS = 1000.0 / FRAME_RATE  # 80 ms
FRAME_S = FRAME_SIZE / SAMPLE_RATE  # 0.08 s
FRAMES_PER_MINUTE = int(60 * FRAME_RATE)  # 750


class FrameChunker:
    """Re-chunk PCM arriving in arbitrary sizes into fixed frames (FRAME_SIZE samples = 80 ms by default)."""

    def __init__(self, frame_size: int = FRAME_SIZE) -> None:
        if frame_size <= 0:
            raise ValueError("frame_size must be positive")
        self.frame_size = frame_size
        self._buf = np.zeros(0, dtype=np.float32)

    @property
    def pending(self) -> int:
        """Samples held back, waiting for the rest of their frame."""
        return int(self._buf.shape[0])

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size == 0:
            return []
        buf = np.concatenate([self._buf, pcm]) if self._buf.size else pcm
        n = buf.shape[0] // self.frame_size
        frames = [buf[i * self.frame_size : (i + 1) * self.frame_size].copy() for i in range(n)]
        self._buf = buf[n * self.frame_size :].copy()
        return frames

    def rest(self) -> np.ndarray:
        """The samples held back (fewer than a frame), handed over and forgotten: the end of a stream."""
        rest, self._buf = self._buf, np.zeros(0, dtype=np.float32)
        return rest

    def reset(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)


class Resampler:
    """Streaming resampler (soxr, "HQ" quality) for any pair of rates; equal rates pass audio through.

    `process` takes any block length; output trails input by soxr's filter delay and buffering (HQ:
    about 20 ms median, under 40 ms, measured for 48/44.1 -> 24 kHz), which is latency, not lost audio:
    `process(..., last=True)` flushes it, and the stream then equals the one-shot `resample`. Cheap
    enough for the audio callback: 0.01-0.02 ms per 80 ms block, against 0.44-0.54 ms for the numpy
    polyphase filter it replaced (`benchmarks/bench_callback.py --compare-rev 24492d9`, same run).
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
        self.src_rate, self.dst_rate = int(src_rate), int(dst_rate)
        self.passthrough = self.src_rate == self.dst_rate
        self.reset()

    def reset(self) -> None:
        import soxr

        self._stream = None if self.passthrough else soxr.ResampleStream(self.src_rate, self.dst_rate, 1, "float32", "HQ")

    def process(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)  # soxr reads the buffer as is
        if self._stream is None:
            return x.copy()
        return self._stream.resample_chunk(x, last=last)


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample a whole signal (1-D, or [channels, samples]), time-aligned, no delay."""
    import soxr

    x = np.asarray(x, dtype=np.float32)
    if src_rate == dst_rate:
        return x.copy()
    if x.ndim == 2:
        return np.ascontiguousarray(soxr.resample(x.T, src_rate, dst_rate, "HQ").T)
    return soxr.resample(x.reshape(-1), src_rate, dst_rate, "HQ")
