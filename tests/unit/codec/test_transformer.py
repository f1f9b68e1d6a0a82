"""Mimi's transformer on a tiny random configuration: window, streaming and memory."""

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.codec.config import CodecTransformerConfig
from moshi_mlx.codec.transformer import CodecTransformer

TINY = CodecTransformerConfig(d_model=16, num_heads=2, num_layers=2, dim_feedforward=32, context=6)


def random_tensors(cfg: CodecTransformerConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f = cfg.d_model, cfg.dim_feedforward
    shapes = {
        "self_attn.in_proj_weight": (3 * d, d), "self_attn.out_proj.weight": (d, d),
        "norm1.weight": (d,), "norm1.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
        "linear1.weight": (f, d), "linear2.weight": (d, f),
        "layer_scale_1.scale": (d,), "layer_scale_2.scale": (d,),
    }
    return {
        f"t.transformer.layers.{i}.{name}": (rng.standard_normal(shape) * 0.3 + (name.startswith("norm") and name.endswith("weight"))).astype(np.float32)
        for i in range(cfg.num_layers)
        for name, shape in shapes.items()
    }


def build(cfg=TINY, seed=0) -> CodecTransformer:
    tensors = random_tensors(cfg, seed)
    return CodecTransformer(cfg, lambda name, shape: tensors[name], "t")


def test_streaming_in_a_rotating_window_equals_the_whole_clip():
    """40 positions, two at a time, through a window of context + 2 = 8 slots: it wraps around five times."""
    t = build()
    x = np.random.default_rng(1).standard_normal((1, 40, TINY.d_model)).astype(np.float32)
    whole = np.array(t(mx.array(x)))
    window = t.new_window(1, 2)
    steps = [np.array(t.step(mx.array(x[:, i : i + 2]), window)) for i in range(0, 40, 2)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole, rtol=1e-4, atol=1e-5)
    assert window.slots == TINY.context + 2 and window.offset == 40


def test_a_query_sees_itself_and_context_positions_before_it():
    """One layer: changing position p changes outputs p .. p + context and nothing after (rustymimi's 251 keys)."""
    cfg = CodecTransformerConfig(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, context=6)
    t = build(cfg)
    x = np.random.default_rng(2).standard_normal((1, 20, 16)).astype(np.float32)
    y = x.copy()
    y[0, 5] = np.random.default_rng(3).standard_normal(16)  # not a constant shift: layer norm hides those
    changed = np.abs(np.array(t(mx.array(x))) - np.array(t(mx.array(y)))).max(axis=-1)[0] > 1e-6
    assert list(np.flatnonzero(changed)) == list(range(5, 5 + cfg.context + 1))


def test_window_memory_is_fixed_from_the_first_step():
    t = build()
    window = t.new_window(1, 2)
    x = mx.ones((1, 2, TINY.d_model))
    sizes = []
    for i in range(50):
        mx.eval(t.step(x, window))
        sizes.append(window.nbytes)
    assert len(set(sizes)) == 1
    assert sizes[0] == 2 * TINY.num_layers * (TINY.context + 2) * TINY.d_model * 4


def test_a_step_longer_than_the_window_allows_is_refused():
    t = build()
    with pytest.raises(ValueError, match="does not fit"):
        t.step(mx.ones((1, 3, TINY.d_model)), t.new_window(1, 2))


def test_moving_positions_back_changes_nothing():
    """A stream whose positions are moved back every 8 positions gives what one that never moves gives."""
    t = build()
    x = np.random.default_rng(5).standard_normal((1, 40, TINY.d_model)).astype(np.float32)
    plain, moved = t.new_window(1, 2), t.new_window(1, 2)
    for i in range(0, 40, 2):
        a = np.array(t.step(mx.array(x[:, i : i + 2]), plain))
        b = np.array(t.step(mx.array(x[:, i : i + 2]), moved, rebase_every=8))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert moved.rebased == 24 and moved.offset == 16 and plain.offset == 40  # moved at 16, 24 and 32
