"""Conditioning and classifier-free guidance at the model level: the fused condition, a batch of two through the
temporal cache, and the depformer combining both halves at every step (Kyutai's PyTorch LMGen)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.errors import MoshiError
from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.models.config import LmConfig
from moshi_mlx.models.lm import cfg_combine

VALUES = ["very_bad", "bad", "neutral", "good", "very_good"]
#: A tiny Hibiki-like model: a summed `description` look-up table, grouped-query attention, delays of 2.
CONFIG = {
    "dim": 128, "num_heads": 4, "num_layers": 2, "hidden_scale": 4.125, "context": 8, "gating": "silu",
    "norm": "rms_norm_f32", "positional_embedding": "rope", "kv_repeat": 2, "text_card": 40, "card": 24,
    "n_q": 4, "dep_q": 2, "delays": [0, 0, 2, 0, 2], "depformer_dim": 64, "depformer_num_heads": 2,
    "depformer_num_layers": 1, "depformer_pos_emb": "none", "depformer_kv_repeat": 1,
    "conditioners": {"description": {"type": "lut", "lut": {"n_bins": 31, "dim": 16, "tokenizer": "noop",
                                                            "possible_values": VALUES}}},
    "fuser": {"sum": ["description"]},
}


def greedy(logits: mx.array, key: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1).astype(mx.int32)


@pytest.fixture(scope="module")
def model():
    mx.random.seed(11)
    lm = build_model(LmConfig.from_dict(CONFIG), None, mx.float32)
    mx.eval(lm.parameters())
    return lm


def test_cfg_combine_is_kyutais_formula():
    good, bad = mx.array([[1.0, 4.0, -2.0]]), mx.array([[0.5, 1.0, 3.0]])
    out = cfg_combine(mx.concatenate([good, bad]), 3.0)
    np.testing.assert_allclose(np.array(out), 3 * np.array(good) - 2 * np.array(bad), rtol=1e-6)
    np.testing.assert_array_equal(np.array(cfg_combine(mx.concatenate([good, bad]), 1.0)), np.array(good))


def test_condition_is_the_projected_table_row(model):
    table = model.condition_provider.conditioners["description"]
    for i, value in enumerate(VALUES):
        want = table.output_proj(table.embed.weight[i])
        np.testing.assert_allclose(np.array(model.condition({"description": value})[0, 0]), np.array(want), atol=1e-6)
    assert model.condition({"description": "very_good"}).shape == (1, 1, 128)


@pytest.mark.parametrize("values,words", [
    ({"description": "superb"}, "'superb' is not one of"), ({"speaker": "x"}, "no condition 'speaker'"),
    ({}, "'description' needs a value"),
])
def test_unknown_conditions_are_one_line_errors(model, values, words):
    with pytest.raises(MoshiError, match=words) as e:
        model.condition(values)
    assert "\n" not in str(e.value)


def test_a_conditioned_model_needs_its_condition(model):
    cache = model.make_cache()
    with pytest.raises(MoshiError, match="needs a condition"):
        model.temporal(mx.zeros((1, 5), dtype=mx.int32), cache.layers, cache.context())


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_batch_of_two_rows_are_the_two_single_runs(model, kv_bits):
    """make_cache(batch=2): row 0 runs the chosen condition, row 1 very_bad, each as if alone; the cache holds
    only the key/value heads (kv_repeat 2)."""
    good, bad = model.condition({"description": "very_good"}), model.condition({"description": "very_bad"})
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 24, (5, 5)).astype(np.int32)
    pair, alone_good, alone_bad = (model.make_cache(batch=b, kv_bits=kv_bits) for b in (2, 1, 1))
    assert model.config.transformer.num_kv_heads == 2
    first = pair.layers[0].keys if kv_bits == 16 else pair.layers[0].keys[0]
    assert first.shape[:2] == (2, 2)
    for step in tokens:
        t = mx.array(step)[None]
        _, both = model.temporal(mx.concatenate([t, t]), pair.layers, pair.context(), mx.concatenate([good, bad]))
        _, one = model.temporal(t, alone_good.layers, alone_good.context(), good)
        _, other = model.temporal(t, alone_bad.layers, alone_bad.context(), bad)
        for cache in (pair, alone_good, alone_bad):
            cache.position += 1
        np.testing.assert_allclose(np.array(both[0]), np.array(one[0]), atol=1e-4)
        np.testing.assert_allclose(np.array(both[1]), np.array(other[0]), atol=1e-4)
    assert np.abs(np.array(both[0] - both[1])).max() > 1e-3  # the conditions do differ


def test_depformer_under_cfg_combines_each_step_and_feeds_one_code_to_both_halves(model):
    good, bad = model.condition({"description": "very_good"}), model.condition({"description": "very_bad"})
    cache = model.make_cache(batch=2)
    start = mx.concatenate([model.start_tokens()[None]] * 2)
    hidden, text_logits = model.temporal(start, cache.layers, cache.context(), mx.concatenate([good, bad]))
    text = greedy(cfg_combine(text_logits, 3.0), None)
    keys = mx.zeros((model.config.generated_codebooks, 2), dtype=mx.uint32)
    codes = model.depformer.sample(hidden, text, greedy, keys, cfg_coef=3.0)
    assert codes.shape == (1, 2)
    # Teacher-forced on what was fed (text, then code 0), each half's logits give the same guided choices.
    fed = mx.concatenate([text[:, None], codes[:, :1]], axis=1)[:, :, None]  # [1, K, 1]
    halves = model.depformer.score(hidden, mx.concatenate([fed, fed]))  # [2, K, 1, card]
    guided = mx.argmax(cfg_combine(halves[:, :, 0], 3.0), axis=-1)
    np.testing.assert_array_equal(np.array(guided), np.array(codes))
    plain = model.depformer.sample(hidden[:1], text, greedy, keys)
    assert plain.shape == (1, 2)


def test_quantized_cache_with_grouped_query_heads_tracks_the_exact_one(model):
    """kv_repeat 2 through the quantized window (each key/value head serves two query heads)."""
    good = model.condition({"description": "good"})
    exact, packed = model.make_cache(kv_bits=16), model.make_cache(kv_bits=8)
    tokens = np.random.default_rng(3).integers(0, 24, (6, 5)).astype(np.int32)
    worst = 0.0
    for step in tokens:
        t = mx.array(step)[None]
        _, a = model.temporal(t, exact.layers, exact.context(), good)
        _, b = model.temporal(t, packed.layers, packed.context(), good)
        exact.position += 1
        packed.position += 1
        worst = max(worst, float(mx.abs(a - b).max()) / float(mx.abs(a).max()))
    assert worst < 0.05
