"""Pure token samplers (temperature, top-k, top-p, min-p), compiled once per setting."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import mlx.core as mx

from .settings import (
    SamplingParams,
    TextControls,
)

Sampler = Callable[[mx.array, mx.array], mx.array]  # (logits [B, V], key) -> tokens [B] int32


def _greedy(logits: mx.array, key: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1).astype(mx.int32)


def _top_k_mask(logits: mx.array, k: int) -> mx.array:
    # Partition (linear time) instead of a full sort over the vocabulary.
    vocab = logits.shape[-1]
    kth = mx.partition(logits, vocab - k, axis=-1)[..., vocab - k : vocab - k + 1]
    return mx.where(logits >= kth, logits, -mx.inf)


def _top_p_mask(logits: mx.array, top_p: float) -> mx.array:
    """Keep the likeliest tokens until their probabilities sum to at least `top_p` (the nucleus)."""
    order = mx.argsort(-logits, axis=-1)  # likeliest first
    probs = mx.take_along_axis(mx.softmax(logits, axis=-1), order, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass of the strictly likelier tokens
    keep = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, before < top_p, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def _min_p_mask(logits: mx.array, min_p: float) -> mx.array:
    # p >= min_p * p_max, in log space: no softmax needed.
    floor = mx.max(logits, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logits >= floor, logits, -mx.inf)


def filter_logits(logits: mx.array, params: SamplingParams, vocab_size: int | None = None) -> mx.array:
    """Tempered float32 logits with every token the filters drop set to -inf (what sampling draws from).

    Order: temperature, top-k, top-p, min-p. Not for greedy (temperature 0).
    """
    logits = logits.astype(mx.float32)
    top_k = params.top_k
    if top_k and (vocab_size is None or top_k < vocab_size):
        logits = _top_k_mask(logits, top_k)  # before tempering, as ever: the same draws as before top-p existed
    logits = logits * (1.0 / params.temperature)
    if params.top_p < 1.0:
        logits = _top_p_mask(logits, params.top_p)
    if params.min_p > 0.0:
        logits = _min_p_mask(logits, params.min_p)
    return logits


# Bounded: web clients choose their own settings, and each distinct pair compiles a function.
@lru_cache(maxsize=64)
def make_sampler(params: SamplingParams, vocab_size: int | None = None) -> Sampler:
    """Return a compiled sampler for `params`; top-k larger than the vocabulary is clamped."""
    if params.temperature == 0.0:
        return mx.compile(_greedy)

    def sample(logits: mx.array, key: mx.array) -> mx.array:
        return mx.random.categorical(filter_logits(logits, params, vocab_size), axis=-1, key=key).astype(mx.int32)

    return mx.compile(sample)


TextSampler = Callable[[mx.array, mx.array, mx.array], mx.array]  # (logits [B, V], recent [B, N], key) -> [B]


def penalise_repetitions(logits: mx.array, recent: mx.array, penalty: float) -> mx.array:
    """Divide (positive) or multiply (negative) the logits of the distinct tokens in `recent` by `penalty`.

    recent: [B, N] int32 token ids; negative entries are empty slots.
    """
    batch, vocab = logits.shape
    # Empty slots point at a spare column past the vocabulary, so one scatter marks every seen token.
    index = mx.where(recent >= 0, recent, vocab)
    seen = mx.put_along_axis(mx.zeros((batch, vocab + 1), dtype=mx.bool_), index, mx.array(True), axis=-1)[:, :vocab]
    penalised = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalised, logits)


@lru_cache(maxsize=64)
def make_text_sampler(
    params: SamplingParams, controls: TextControls, vocab_size: int, pad_id: int
) -> TextSampler:
    """Compiled text sampler: repetition penalty, then temperature / top-k, with pad_mult on the padding token."""
    base = make_sampler(params, vocab_size)
    penalty = controls.repetition_penalty if controls.penalises else None
    # The padding boost is in units of the tempered logits; greedy has temperature 1 for this purpose.
    pad_shift = controls.pad_mult * (params.temperature if params.temperature > 0 else 1.0)
    boost = mx.zeros((vocab_size,), dtype=mx.float32)
    if pad_shift:
        boost = mx.where(mx.arange(vocab_size) == pad_id, pad_shift, 0.0)

    def sample(logits: mx.array, recent: mx.array, key: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if penalty is not None:
            logits = penalise_repetitions(logits, recent, penalty)
        if pad_shift:
            logits = logits + boost
        return base(logits, key)

    return mx.compile(sample)
