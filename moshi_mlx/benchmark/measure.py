"""Measurement: the one timing loop (`timed`), its statistics, memory readings and progress bars."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from tqdm import tqdm

from ..memory import rss_bytes


@dataclass(frozen=True)
class Stats:
    """Milliseconds per call over `n` timed calls (nearest-rank p90, as benchmarks/reference_step.py)."""

    n: int
    median_ms: float
    p90_ms: float
    max_ms: float
    mean_ms: float
    min_ms: float

    @classmethod
    def of(cls, times_ms: list[float]) -> "Stats":
        if not times_ms:
            raise ValueError("no timings to summarise")
        ordered = sorted(float(t) for t in times_ms)
        p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
        return cls(
            n=len(ordered),
            median_ms=round(statistics.median(ordered), 3),
            p90_ms=round(p90, 3),
            max_ms=round(ordered[-1], 3),
            mean_ms=round(statistics.fmean(ordered), 3),
            min_ms=round(ordered[0], 3),
        )


def timed(
    call: Callable[[int], object],
    n: int,
    warmup: int = 0,
    bar: tqdm | None = None,
    after: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Call `call(i)` for i in range(warmup + n); milliseconds of each of the last `n` calls.

    `after(i, ms)` runs outside the timed region (memory probes, snapshots).
    """
    times: list[float] = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        call(i)
        ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
        if after is not None:
            after(i, ms)
        if bar is not None:
            bar.update()
    return times


def gb(n: float | None) -> float | None:
    return None if n is None else round(n / 1e9, 3)


def mb(n: float | None) -> float | None:
    return None if n is None else round(n / 1e6, 1)


@dataclass(frozen=True)
class PhaseMemory:
    """Peak memory while one phase ran (MLX's allocator and the process's resident set)."""

    mlx_peak_gb: float
    rss_peak_gb: float  # highest resident set sampled between the phase's steps
    rss_end_gb: float


class MemoryProbe:
    """Tracks one phase's peaks: MLX's peak counter is reset at the start; RSS is sampled between steps.

    ru_maxrss cannot be reset, so an earlier phase's peak (e.g. while loading) would hide this
    one's; sampling the current resident set after each step (outside the timed region) can.
    """

    def __init__(self) -> None:
        mx.reset_peak_memory()
        self._rss_peak = rss_bytes()

    def sample(self, *_: object) -> None:
        self._rss_peak = max(self._rss_peak, rss_bytes())

    def result(self) -> PhaseMemory:
        self.sample()
        return PhaseMemory(gb(mx.get_peak_memory()), gb(self._rss_peak), gb(rss_bytes()))
