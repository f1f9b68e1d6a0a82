"""The LM step as the app runs it (`LmGen.step`), and the same step timing its own two halves."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..cli import Progress
from ..generate import LmGen, StepTimings
from ..models.config import LmConfig
from ..models.lm import Lm
from ..settings import (
    DEFAULT_AUDIO_SAMPLING,
    DEFAULT_TEXT_SAMPLING,
    EngineSettings,
    SamplingParams,
)
from .measure import Stats, gb, timed


@dataclass(frozen=True)
class LmTimes:
    step: Stats  # LmGen.step: submit + wait for the sampled tokens
    steps_per_s: float
    start_position: int  # session position of the first timed step (context = window already full)
    kv_cache_gb: float  # the temporal transformer's KV cache, measured on the generator
    temporal: Stats | None = None  # the same step with `gen.timings` attached (one sync between halves)
    depformer: Stats | None = None
    depformer_share: float | None = None


def kv_kwargs(kv_bits: int | None, context: int | None = None) -> dict[str, int]:
    """The KV cache the memory plan chose (precision, window); None keeps LmGen's own default."""
    return {k: v for k, v in (("kv_bits", kv_bits), ("context", context)) if v is not None}


@dataclass(frozen=True)
class GuidanceTimes:
    """A conditioned model's step with classifier-free guidance off (C = 1: one row) and on (C: two rows)."""

    coef: float
    off: Stats
    on: Stats

    @property
    def cost(self) -> float:
        """How many times longer a guided step takes."""
        return round(self.on.median_ms / self.off.median_ms, 3)


def new_generator(
    lm: Lm, text: SamplingParams, audio: SamplingParams, seed: int, kv_bits: int | None = None,
    context: int | None = None, condition: str | None = None, cfg_coef: float = 1.0,
) -> LmGen:
    return LmGen(lm, text, audio, seed=seed, condition=condition, cfg_coef=cfg_coef, **kv_kwargs(kv_bits, context))


def engine_settings(settings: EngineSettings, kv_bits: int | None, context: int | None = None) -> EngineSettings:
    return replace(settings, **kv_kwargs(kv_bits, context))


def seek(gen: LmGen, position: int) -> None:
    """Make the session `position` steps old, so the attention window reads that many slots.

    Only the cost matters, so stale cache contents are fine. LmGen keeps its cache private;
    this and `kv_cache_bytes` are the only places that reach into it.
    """
    gen._cache.position = int(position)


def kv_cache_bytes(gen: LmGen) -> int:
    return int(gen._cache.nbytes)


def user_codes(config: LmConfig, n: int, seed: int = 0) -> np.ndarray:
    """What Mimi would hand the LM for n frames of the user's voice: [n, user_codebooks]."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.audio_card, size=(n, config.user_codebooks)).astype(np.int32)


def _run_steps(gen: LmGen, steps: int, warmup: int, position: int, seed: int, bar, after) -> list[float]:
    gen.reset()
    seek(gen, position)
    codes = user_codes(gen.config, warmup + steps, seed)
    return timed(lambda i: gen.step(codes[i]), steps, warmup, bar, after)


def time_lm(
    lm: Lm,
    steps: int,
    warmup: int,
    position: int,
    seed: int = 0,
    kv_bits: int | None = None,
    split: bool = True,
    progress: Progress | None = None,
    after: Callable[[int, float], None] | None = None,
    text: SamplingParams = DEFAULT_TEXT_SAMPLING,
    audio: SamplingParams = DEFAULT_AUDIO_SAMPLING,
    context: int | None = None,
    condition: str | None = None,
    cfg_coef: float = 1.0,
) -> LmTimes:
    """LmGen.step timed as is, then (with `split`) again with its own per-half timings attached."""
    progress = progress or Progress(enabled=False)
    gen = new_generator(lm, text, audio, seed, kv_bits, context, condition, cfg_coef)
    with progress.bar(warmup + steps, "LM step") as bar:
        times = _run_steps(gen, steps, warmup, position, seed, bar, after)
    stats = Stats.of(times)
    result = LmTimes(stats, round(1e3 / stats.median_ms, 3), position, gb(kv_cache_bytes(gen)))
    if not split:
        return result
    gen.timings = StepTimings()
    with progress.bar(warmup + steps, "LM step, halves timed") as bar:
        _run_steps(gen, steps, warmup, position, seed, bar, after)
    temporal, depformer = Stats.of(gen.timings.temporal_ms[warmup:]), Stats.of(gen.timings.depformer_ms[warmup:])
    share = round(depformer.median_ms / (temporal.median_ms + depformer.median_ms), 4)
    return LmTimes(result.step, result.steps_per_s, position, result.kv_cache_gb, temporal, depformer, share)


#: The guidance timed when the command line leaves --cfg-coef at 1 (Hibiki's README: "typical value 3").
TIMED_CFG_COEF = 3.0


def time_guidance(
    lm: Lm, steps: int, warmup: int, position: int, seed: int, kv_bits: int | None, progress: Progress | None,
    text: SamplingParams, audio: SamplingParams, context: int | None, condition: str | None, cfg_coef: float,
) -> GuidanceTimes:
    """The same steps of a conditioned model with guidance off, then on (`cfg_coef`, or 3 when it is 1)."""
    progress = progress or Progress(enabled=False)
    coef = cfg_coef if cfg_coef != 1.0 else TIMED_CFG_COEF
    stats = []
    for c in (1.0, coef):
        gen = new_generator(lm, text, audio, seed, kv_bits, context, condition, c)
        with progress.bar(warmup + steps, f"LM step, CFG {c:g}") as bar:
            stats.append(Stats.of(_run_steps(gen, steps, warmup, position, seed, bar, None)))
        del gen  # its KV cache goes before the next one is allocated
    return GuidanceTimes(coef, stats[0], stats[1])
