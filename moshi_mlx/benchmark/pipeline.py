"""Mimi alone, and the whole pipeline (mic frame in -> speaker frame out) as the app runs it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..audio.frames import FRAME_MS, FRAME_SIZE, SAMPLE_RATE
from ..cli import Progress
from ..engine import ConversationEngine, EngineRunner, FrameResult
from .measure import Stats, timed
from .steps import seek


def speechlike_pcm(n_frames: int, seed: int = 0) -> np.ndarray:
    """[n_frames, FRAME_SIZE] float32: a wobbling tone in quiet noise (Mimi's cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * FRAME_SIZE) / SAMPLE_RATE
    tone = 0.2 * np.sin(2 * np.pi * (180 + 40 * np.sin(2 * np.pi * 3 * t)) * t)
    pcm = tone + 0.02 * rng.standard_normal(t.shape)
    return pcm.astype(np.float32).reshape(n_frames, FRAME_SIZE)


@dataclass(frozen=True)
class MimiTimes:
    encode: Stats  # one 80 ms frame of audio -> codes
    decode: Stats  # one frame of codes -> 80 ms of audio
    dtype: str


def time_mimi(mimi, frames: int, warmup: int, seed: int = 0, progress: Progress | None = None) -> MimiTimes:
    """Mimi encode and decode of one frame each, from a fresh stream."""
    progress = progress or Progress(enabled=False)
    pcm = speechlike_pcm(warmup + frames, seed)
    codes = np.random.default_rng(seed).integers(0, 2048, size=(warmup + frames, mimi.num_codebooks))
    mimi.reset()
    with progress.bar(2 * (warmup + frames), "Mimi encode + decode") as bar:
        encode = timed(lambda i: mimi.encode_frame(pcm[i]), frames, warmup, bar)
        decode = timed(lambda i: mimi.decode_frame(codes[i]), frames, warmup, bar)
    mimi.reset()
    return MimiTimes(Stats.of(encode), Stats.of(decode), str(mimi.dtype))


@dataclass(frozen=True)
class Sequential:
    frame: Stats  # ConversationEngine.process: encode + LM step + decode, one after the other
    stages: dict[str, Stats]  # the engine's own per-stage timings


def time_sequential(
    engine: ConversationEngine,
    frames: int,
    warmup: int,
    position: int,
    progress: Progress | None = None,
    after: Callable[[int, float], None] | None = None,
) -> Sequential:
    progress = progress or Progress(enabled=False)
    pcm = speechlike_pcm(warmup + frames, 1)
    engine.reset()
    seek(engine.gen, position)
    stages: dict[str, list[float]] = {}

    def frame(i: int) -> None:
        result = engine.process(pcm[i])
        if i >= warmup:
            for name, ms in result.timings_ms.items():
                stages.setdefault(name, []).append(ms)

    with progress.bar(warmup + frames, "pipeline, sequential") as bar:
        totals = timed(frame, frames, warmup, bar, after)
    engine.reset()
    return Sequential(Stats.of(totals), {name: Stats.of(ms) for name, ms in stages.items()})


@dataclass(frozen=True)
class RunnerResult:
    paced: bool  # True: one frame every 80 ms like a microphone; False: kept busy (throughput)
    frames_in: int
    frames_out: int
    dropped: int  # input frames the runner skipped because it fell behind
    timed_out: bool
    ms_per_frame: float | None = None  # throughput (not paced)
    latency: Stats | None = None  # frame pushed -> its output ready (paced)


def time_runner(
    engine: ConversationEngine,
    frames: int,
    warmup: int,
    position: int,
    paced: bool,
    progress: Progress | None = None,
    after: Callable[[int, float], None] | None = None,
) -> RunnerResult:
    """The threaded EngineRunner, as the real-time front ends drive it.

    Kept busy (a new frame whenever fewer than 6 are in flight), the rate frames come out is the
    pipeline's throughput. Paced, it reports latency and how many frames it had to drop.
    """
    progress = progress or Progress(enabled=False)
    total = warmup + frames
    pcm = speechlike_pcm(total, 2)
    engine.reset()
    seek(engine.gen, position)
    cond = threading.Condition()
    out_times: list[float] = []
    latencies: list[float] = []
    errors: list[BaseException] = []

    def on_result(result: FrameResult) -> None:
        with cond:
            out_times.append(time.perf_counter())
            latencies.append(runner.stats.last_latency_ms)
            cond.notify_all()

    def on_error(e: BaseException) -> None:
        with cond:
            errors.append(e)
            cond.notify_all()

    in_flight = 6
    runner = EngineRunner(engine, on_result, max_pending=3 if paced else 2 * in_flight, on_error=on_error)
    deadline = time.monotonic() + 60.0 + total * 10.0
    start = time.perf_counter()
    with progress.bar(total, "pipeline, real-time pace" if paced else "pipeline, threaded") as bar, runner:
        for i in range(total):
            if paced:
                time.sleep(max(0.0, start + i * FRAME_MS / 1e3 - time.perf_counter()))
            else:
                with cond:
                    while not errors and i - len(out_times) >= in_flight and time.monotonic() < deadline:
                        cond.wait(0.05)
            if errors or time.monotonic() > deadline:
                break
            runner.push(pcm[i])
            if after is not None:
                after(i, 0.0)
            bar.update()
        with cond:
            while not errors and len(out_times) + runner.stats.dropped < total and time.monotonic() < deadline:
                cond.wait(0.05)
    engine.reset()
    if errors:
        raise RuntimeError(f"the engine runner failed: {errors[0]}") from errors[0]
    stats, done = runner.stats, len(out_times)
    result = RunnerResult(paced, stats.frames_in, done, stats.dropped, done + stats.dropped < total)
    if paced:
        timed_latencies = latencies[warmup:] or latencies
        return replace(result, latency=Stats.of(timed_latencies) if timed_latencies else None)
    # Throughput over the frames after warm-up: time between the warm-up's last output and the last one.
    first = min(warmup, max(done - 2, 0))
    if done < 2 or done - first < 1:
        return result
    span = out_times[done - 1] - (out_times[first - 1] if first > 0 else start)
    return replace(result, ms_per_frame=round(span * 1e3 / (done - first), 3))


@dataclass(frozen=True)
class PromptTimes:
    """A persona model's system prompt at a conversation's start: played (cold) vs restored (warm)."""

    steps: int  # LmGen steps the prompt takes
    cold_ms: float  # median: voice (Mimi-encoded if a recording), silences, role text, silences
    warm_ms: float  # median: the snapshot of the same prompt put back
    snapshot_mb: float  # one snapshot (KV entries of the prompt's steps and the token buffers)
    runs: int


def time_prompt(engine: ConversationEngine, runs: int = 3) -> PromptTimes:
    """Start `runs` conversations with the snapshots dropped (cold), and `runs` from the snapshot (warm)."""
    if engine.prompt is None:
        raise ValueError("the engine has no persona prompt to time")
    cold, warm = [], []
    for _ in range(runs):
        engine.snapshots.clear()
        engine.reset()
        cold.append(engine.prompt_seconds * 1e3)
        engine.reset()
        assert engine.prompt_restored
        warm.append(engine.prompt_seconds * 1e3)
    return PromptTimes(
        steps=engine.prompt.steps(), cold_ms=round(float(np.median(cold)), 3), warm_ms=round(float(np.median(warm)), 3),
        snapshot_mb=round(engine.snapshots.nbytes / 2**20, 3), runs=runs,
    )
