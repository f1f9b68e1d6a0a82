"""Quantized LM key/value cache: footprint, and logits against the exact cache past the window wrap."""

import argparse

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.models.cache import kv_cache_bytes
from moshi_mlx.models.config import config_tiny

CONTEXT = 48  # small window so 300 steps wrap it 6 times and stay fast


@pytest.fixture(scope="module")
def logits_by_bits():
    """Text logits of the same random-weight model on the same random tokens, for kv_bits 16/8/4."""
    mx.random.seed(3)
    cfg = config_tiny(context=CONTEXT)
    model = build_model(cfg, None, mx.float32)
    tokens = mx.array(np.random.default_rng(0).integers(0, cfg.audio_card, (300, 1, 1 + cfg.audio_codebooks), np.int32))
    out = {}
    for bits in (16, 8, 4):
        cache = model.make_cache(kv_bits=bits)
        steps = []
        for t in range(tokens.shape[0]):
            _, logits = model.temporal(tokens[t], cache.layers, cache.context())
            cache.position += 1
            steps.append(logits)
            if t % 64 == 0:
                mx.eval(steps)
        out[bits] = np.array(mx.stack(steps)[:, 0])
    return out


@pytest.mark.parametrize("bits,max_err,mean_err,agreement", [(8, 0.05, 0.005, 0.95), (4, 0.6, 0.06, 0.8)])
def test_quantized_kv_tracks_the_exact_cache(logits_by_bits, bits, max_err, mean_err, agreement):
    exact, quant = logits_by_bits[16], logits_by_bits[bits]
    assert exact.shape == (300, config_tiny().text_out_vocab_size)
    err = np.abs(quant - exact)
    same = (quant.argmax(-1) == exact.argmax(-1)).mean()
    # Measured (random weights, logits of mean magnitude ~0.45): 8-bit max 0.017 / mean 0.0014 / 99 %
    # greedy agreement; 4-bit max 0.26 / mean 0.025 / 90 %. Bounds leave ~2-3x headroom.
    assert err.max() < max_err and err.mean() < mean_err and same >= agreement, (err.max(), err.mean(), same)
    assert err.mean() > 0  # the quantized path really ran
    late = np.abs(quant[-100:] - exact[-100:]).mean()  # after 6 wraps: no drift
    assert late < 2 * mean_err, late


def test_quantized_cache_footprint():
    model = build_model(config_tiny(context=CONTEXT), None, mx.bfloat16)
    t = model.config.transformer
    sizes = {}
    for bits in (16, 8, 4):
        cache = model.make_cache(kv_bits=bits)
        assert cache.nbytes == kv_cache_bytes(t.num_layers, t.num_heads, t.head_dim, CONTEXT, bits)
        sizes[bits] = cache.nbytes
    assert sizes[8] < 0.6 * sizes[16] and sizes[4] < 0.6 * sizes[8]
    assert model.make_cache(kv_bits=8, context=16).capacity == 16
    with pytest.raises(ValueError, match="kv_bits"):
        model.make_cache(kv_bits=3)


def test_kv_bits_flag_reaches_the_engine_settings():
    from moshi_mlx.cli.flags import add_engine_args, settings_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert settings_from_args(parser.parse_args(["--kv-bits", "8"])).kv_bits == 8
    assert settings_from_args(parser.parse_args([])).kv_bits is None  # left to the memory plan
    assert settings_from_args(parser.parse_args(["--kv-bits", "16"])).kv_bits == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-bits", "6"])


def test_on_cuda_the_filling_quantized_window_is_handed_out_contiguous(monkeypatch):
    """MLX's CUDA quantized_matmul has no kernel for a strided operand: while the window fills (a slice of the
    buffer), the cache hands out a contiguous copy there; full, the buffer itself. No GPU here: `on_cuda` is
    stood in and the copies counted; benchmarks/gpu_check.sh runs these tests on a real GPU."""
    from moshi_mlx.models import cache

    copies = []
    real = mx.contiguous
    monkeypatch.setattr(cache, "on_cuda", lambda: True)
    monkeypatch.setattr(mx, "contiguous", lambda a, *args: copies.append(a.shape) or real(a, *args))
    capacity = 2 * cache.LENGTH_BUCKET
    kv = cache.QuantizedRotatingKVCache.allocate(1, 2, 64, capacity, mx.float32, bits=8)
    rng = np.random.default_rng(0)
    for position, want_copies in ((0, 6), (capacity - 1, 0)):
        copies.clear()
        new = mx.array(rng.standard_normal((1, 2, 1, 64)).astype(np.float32))
        ctx = cache.StepContext.for_position(position, capacity)
        keys, values, _ = kv.update(new, new, ctx)
        length = ctx.mask.shape[-1]
        assert len(copies) == want_copies and all(a.shape[2] == length for a in (*keys, *values))
        for got, stored in zip((*keys, *values), (*kv.keys, *kv.values)):
            assert mx.array_equal(got, stored[:, :, :length]).item()
    monkeypatch.setattr(cache, "on_cuda", lambda: False)
    copies.clear()
    kv.update(new, new, cache.StepContext.for_position(1, capacity))
    assert copies == []  # Metal and CPU read the slice as it is
