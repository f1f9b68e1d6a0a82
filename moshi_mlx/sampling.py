"""Pure token samplers (temperature + top-k), compiled once per setting."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import mlx.core as mx

Sampler = Callable[[mx.array, mx.array], mx.array]  # (logits [B, V], key) -> tokens [B] int32


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 250

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


DEFAULT_TEXT_SAMPLING = SamplingParams(temperature=0.7, top_k=25)
DEFAULT_AUDIO_SAMPLING = SamplingParams(temperature=0.8, top_k=250)
GREEDY = SamplingParams(temperature=0.0, top_k=0)


def _greedy(logits: mx.array, key: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1).astype(mx.int32)


def _top_k_mask(logits: mx.array, k: int) -> mx.array:
    # Partition (linear time) instead of a full sort over the vocabulary.
    vocab = logits.shape[-1]
    kth = mx.partition(logits, vocab - k, axis=-1)[..., vocab - k : vocab - k + 1]
    return mx.where(logits >= kth, logits, -mx.inf)


# Bounded: web clients choose their own settings, and each distinct pair compiles a function.
@lru_cache(maxsize=64)
def make_sampler(params: SamplingParams, vocab_size: int | None = None) -> Sampler:
    """Return a compiled sampler for `params`; top-k larger than the vocabulary is clamped."""
    if params.temperature == 0.0:
        return mx.compile(_greedy)
    top_k = params.top_k
    if vocab_size is not None and top_k >= vocab_size:
        top_k = 0
    inv_temp = 1.0 / params.temperature

    def sample(logits: mx.array, key: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if top_k:
            logits = _top_k_mask(logits, top_k)
        return mx.random.categorical(logits * inv_temp, axis=-1, key=key).astype(mx.int32)

    return mx.compile(sample)
