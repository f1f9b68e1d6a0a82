"""Everything one benchmark run measured, as dataclasses (written as JSON with a schema version)."""

from __future__ import annotations

from typing import Any

import dataclasses
import json
from dataclasses import dataclass

from .loaded import LoadTimes, ModelInfo
from .long import LongRun
from .machine import Machine
from .measure import PhaseMemory
from .pipeline import MimiTimes, PromptTimes, RunnerResult, Sequential
from .steps import GuidanceTimes, LmTimes

SCHEMA = "moshi_mlx.benchmark/2"


@dataclass(frozen=True)
class Settings:
    steps: int
    warmup: int
    start_position: int  # session position the timed steps start at (= context: window already full)
    context: int
    seed: int
    realtime_frames: int
    kv_bits: int | None
    split: bool
    long: bool


@dataclass(frozen=True)
class Pipeline:
    sequential: Sequential
    threaded: RunnerResult
    realtime: RunnerResult | None


@dataclass(frozen=True)
class Memory:
    lm: PhaseMemory | None  # the LM steps alone, before Mimi runs
    pipeline: PhaseMemory | None  # LM + Mimi both ways + the runner's buffers
    mlx_peak_gb: float  # MLX's allocator, whole run (loading included)
    rss_peak_gb: float  # the process's peak resident set, whole run (ru_maxrss)
    weights_gb: float
    kv_cache_gb: float | None
    mimi_gb: float  # what Mimi holds: rustymimi's instances as loaded, or the MLX Mimi's weights and streams
    mimi_instances: int
    mimi_note: str = ""  # which codec, and where its memory lives
    mimi_in_mlx_gb: float = 0.0  # the part of mimi_gb inside MLX's allocator (the MLX Mimi), counted in MLX peaks

    @property
    def activations_gb(self) -> float | None:
        """MLX's peak beyond weights and KV cache: one step's activations plus the allocator's cache."""
        lm = self.lm or self.pipeline
        if lm is None:
            return None
        return round(max(0.0, lm.mlx_peak_gb - self.weights_gb - (self.kv_cache_gb or 0.0) - self.mimi_in_mlx_gb), 3)

    @property
    def rest_gb(self) -> float:
        """The process's peak beyond MLX and Mimi: Python, libraries, tokenizer, audio buffers, and the
        checkpoint pages mapped while loading."""
        return round(max(0.0, self.rss_peak_gb - self.mlx_peak_gb - (self.mimi_gb - self.mimi_in_mlx_gb)), 3)


@dataclass(frozen=True)
class Verdict:
    line: str
    keeps_up: bool
    ms_per_frame: float  # work per 80 ms frame on the basis below
    basis: str  # what was timed: threaded pipeline, sequential pipeline or the LM alone
    rtf: float  # ms_per_frame / 80: below 1 keeps up
    headroom: float  # 1 - rtf: negative when it falls behind


@dataclass(frozen=True)
class BenchResult:
    created: str
    command: str
    machine: Machine
    model: ModelInfo
    load: LoadTimes
    settings: Settings
    memory: Memory
    verdict: Verdict
    lm: LmTimes | None = None
    guidance: GuidanceTimes | None = None  # a conditioned model: the step with CFG off and on
    mimi: MimiTimes | None = None
    pipeline: Pipeline | None = None
    long: LongRun | None = None
    prompt: PromptTimes | None = None  # a persona prompt (--text-prompt / --voice): played vs restored
    transcribe_user: Any = None  # benchmark.stt.OnTopTimes: Moshi's frame with the user's STT beside it
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["memory"].update(activations_gb=self.memory.activations_gb, rest_gb=self.memory.rest_gb)
        if self.long is not None:
            out["long"]["flat"] = self.long.flat
        if self.guidance is not None:
            out["guidance"]["cost"] = self.guidance.cost
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"
