"""A long session: does step time and memory stay flat, and what does the process hold after 1, 10, 60 minutes?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from ..audio.frames import FRAMES_PER_MINUTE
from ..cli import Progress
from ..memory import rss_bytes
from .measure import Stats, mb, timed

MINUTES = (1, 10, 60)
DEFAULT_LONG_STEPS = 60 * FRAMES_PER_MINUTE  # one hour of audio (runs faster than real time on small models)


@dataclass(frozen=True)
class Window:
    first_step: int
    last_step: int
    time: Stats
    mlx_active_mb: float
    rss_mb: float


@dataclass(frozen=True)
class MinuteMark:
    minute: int  # of audio, not of wall-clock time
    step: int
    rss_mb: float
    mlx_active_mb: float


@dataclass(frozen=True)
class LongRun:
    steps: int
    window: int
    pipeline: bool  # True: the whole engine (Mimi both ways too) each step; False: LM only
    start: Window
    middle: Window
    end: Window
    minutes: list[MinuteMark]  # the marks this run reached
    mlx_active_growth_mb: float  # middle -> end
    rss_growth_mb: float  # middle -> end
    end_over_middle_time: float
    flat_memory: bool
    flat_time: bool

    @property
    def flat(self) -> bool:
        return self.flat_memory and self.flat_time


def long_session(
    step: Callable[[int], object], steps: int, warmup: int, pipeline: bool, progress: Progress | None = None
) -> LongRun:
    """Run `steps` steps; time and memory over windows at the start, middle and end, RSS at minute marks."""
    progress = progress or Progress(enabled=False)
    window = max(1, min(200, max(5, steps // 20), steps // 3 or steps))
    middle = max(0, steps // 2 - window // 2)
    bounds = {"start": (0, window), "middle": (middle, middle + window), "end": (steps - window, steps)}
    times = [0.0] * steps
    windows: dict[str, Window] = {}
    minutes: list[MinuteMark] = []

    def snapshot(i: int, ms: float) -> None:
        n = i - warmup  # timed step index
        if n < 0:
            return
        times[n] = ms
        for name, (a, b) in bounds.items():
            if n == b - 1:
                windows[name] = Window(a, b - 1, Stats.of(times[a:b]), mb(mx.get_active_memory()), mb(rss_bytes()))
        if (n + 1) % FRAMES_PER_MINUTE == 0 and (n + 1) // FRAMES_PER_MINUTE in MINUTES:
            minutes.append(MinuteMark((n + 1) // FRAMES_PER_MINUTE, n + 1, mb(rss_bytes()), mb(mx.get_active_memory())))

    with progress.bar(warmup + steps, "long session" + (" (pipeline)" if pipeline else " (LM)")) as bar:
        timed(step, steps, warmup, bar, snapshot)
    mid, end = windows["middle"], windows["end"]
    mem_growth = round(end.mlx_active_mb - mid.mlx_active_mb, 1)
    rss_growth = round(end.rss_mb - mid.rss_mb, 1)
    ratio = round(end.time.median_ms / mid.time.median_ms, 3) if mid.time.median_ms > 0 else 1.0
    # MLX's active memory is exact and must not grow; RSS wobbles a little with the allocators;
    # step time on a shared machine is noisy, so 25 % is allowed.
    return LongRun(
        steps=steps,
        window=window,
        pipeline=pipeline,
        start=windows["start"],
        middle=mid,
        end=end,
        minutes=minutes,
        mlx_active_growth_mb=mem_growth,
        rss_growth_mb=rss_growth,
        end_over_middle_time=ratio,
        flat_memory=bool(mem_growth <= 1.0 and rss_growth <= 64.0),
        flat_time=bool(ratio <= 1.25),
    )
