"""Memory measurements shared by the benchmark: process RSS and a long Mimi run (RSS at given minutes)."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import numpy as np


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; on macOS the peak, the best `resource` offers)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def mimi_long_run(
    mimi, minutes: list[float], log: Callable[[str], None] = lambda s: None, seed: int = 0
) -> dict[str, float]:
    """Encode and decode ``max(minutes)`` of synthetic audio through ``mimi`` as fast as it goes.

    Returns {"rss_mb_at_min_<m>": RSS in MB after that many minutes of audio, "rss_max_mb_min_<m>": the highest
    RSS seen during that minute}. RSS saw-tooths with Mimi's turns (one minute each, see mimi.py), so the
    per-minute maximum is the figure to compare across minutes. Faster than real time is fine: what is
    measured is memory against frames processed, not timing.
    """
    from .frames import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE

    rng = np.random.default_rng(seed)
    t = np.arange(FRAME_SIZE) / SAMPLE_RATE
    marks = {int(round(m * 60 * FRAME_RATE)): m for m in sorted(minutes)}
    total = max(marks)
    out: dict[str, float] = {}
    start = time.perf_counter()
    frames_per_minute = int(60 * FRAME_RATE)
    minute_max = 0
    for i in range(1, total + 1):
        # A tone with noise that changes every frame: the codec sees varying input, not silence.
        pcm = (0.1 * np.sin(2 * np.pi * (120 + i % 50) * t) + 0.01 * rng.standard_normal(FRAME_SIZE)).astype(np.float32)
        mimi.decode_frame(mimi.encode_frame(pcm))
        if i % 25 == 0 or i in marks:  # 2 samples per second of audio
            now = rss_bytes()
            minute_max = max(minute_max, now)
        if i in marks:
            out[f"rss_max_mb_min_{marks[i]:g}"] = minute_max / 1e6
            out[f"rss_mb_at_min_{marks[i]:g}"] = now / 1e6  # the same reading, so max >= at
            log(f"minute {marks[i]:g}: RSS {out[f'rss_mb_at_min_{marks[i]:g}']:.1f} MB "
                f"(max in that minute {minute_max / 1e6:.1f} MB; {i} frames, {time.perf_counter() - start:.0f} s, "
                f"loads {mimi.loads}, handoffs {mimi.handoffs})")
        if i % frames_per_minute == 0:
            minute_max = 0
    return out
