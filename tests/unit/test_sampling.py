import math

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.sampling import make_sampler
from moshi_mlx.settings import GREEDY, SamplingParams


def test_greedy_is_argmax():
    logits = mx.array(np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32))
    out = make_sampler(GREEDY)(logits, mx.random.key(0))
    assert np.array_equal(np.array(out), np.argmax(np.array(logits), axis=-1))


def test_top_k_only_draws_from_the_k_best():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((1, 2048)).astype(np.float32)
    top = set(np.argsort(-logits[0])[:5].tolist())
    sampler = make_sampler(SamplingParams(temperature=5.0, top_k=5), 2048)
    draws = {int(sampler(mx.array(logits), mx.random.key(i))[0]) for i in range(200)}
    assert draws <= top and len(draws) > 1


def test_seeded_sampling_is_reproducible():
    logits = mx.zeros((1, 32000))
    sampler = make_sampler(SamplingParams(1.0, 0), 32000)
    a = [int(sampler(logits, mx.random.key(s))[0]) for s in range(5)]
    b = [int(sampler(logits, mx.random.key(s))[0]) for s in range(5)]
    assert a == b and len(set(a)) > 1


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": -3}])
def test_invalid_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def _numpy_penalty(logits, recent, penalty):
    out = logits.copy()
    for b in range(logits.shape[0]):
        for tok in set(int(t) for t in recent[b] if t >= 0):
            out[b, tok] = out[b, tok] / penalty if out[b, tok] > 0 else out[b, tok] * penalty
    return out


def test_repetition_penalty_matches_the_definition():
    from moshi_mlx.sampling import penalise_repetitions

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50)).astype(np.float32)
    recent = np.array([[3, 7, 7, -1, 12, 49], [-1, -1, -1, 0, 0, 5]], np.int32)  # repeats count once
    got = np.array(penalise_repetitions(mx.array(logits), mx.array(recent), 1.7))
    np.testing.assert_allclose(got, _numpy_penalty(logits, recent, 1.7), rtol=1e-6)
    assert not np.allclose(got, logits)


def test_pad_mult_scales_the_padding_probability():
    from moshi_mlx.sampling import make_text_sampler
    from moshi_mlx.settings import TextControls

    logits = mx.zeros((4000, 8))  # uniform: padding (id 3) has p = 1/8; 4000 independent rows
    params = SamplingParams(temperature=2.0, top_k=0)  # the boost is in tempered units: any temperature
    sampler = make_text_sampler(params, TextControls(pad_mult=math.log(7.0)), 8, 3)
    draws = np.array(sampler(logits, mx.full((4000, 1), -1), mx.random.key(0)))
    # p(pad) = 7 / (7 + 7) = 0.5 once its probability is multiplied by exp(pad_mult) = 7.
    assert abs((draws == 3).mean() - 0.5) < 0.04
    greedy = make_text_sampler(GREEDY, TextControls(pad_mult=-1.0), 8, 3)
    row = mx.array([[0.0, 0, 0, 0.5, 0, 0, 0, 0]])
    assert int(greedy(row, mx.full((1, 1), -1), mx.random.key(0))[0]) == 0


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(repetition_penalty_context=-1), "repetition_penalty_context"),
        (dict(pad_mult=float("inf")), "pad_mult"),
    ],
)
def test_text_controls_reject_bad_values(kwargs, fragment):
    from moshi_mlx.settings import TextControls

    with pytest.raises(ValueError, match=fragment):
        TextControls(**kwargs)


# -- top-p and min-p against a NumPy reference ------------------------------------------------------
def _numpy_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The definitions, row by row in float64: which tokens survive, as tempered logits (-inf dropped)."""
    out = np.full(logits.shape, -np.inf)
    for b, row in enumerate(logits.astype(np.float64)):
        keep = np.ones(row.shape, bool)
        if top_k:
            keep &= row >= np.sort(row)[-top_k]
        tempered = np.where(keep, row / temperature, -np.inf)
        probs = np.exp(tempered - tempered.max())
        probs /= probs.sum()
        mass = 0.0
        for i in np.argsort(-tempered, kind="stable"):
            if mass >= top_p:
                keep[i] = False
            mass += probs[i]
        keep &= probs >= min_p * probs.max()
        out[b] = np.where(keep, tempered, -np.inf)
    return out


FILTERS = [(1.0, 0, 0.9, 0.0), (0.7, 0, 0.5, 0.0), (1.3, 40, 0.8, 0.0), (1.0, 0, 1.0, 0.05),
           (0.8, 0, 1.0, 0.3), (1.0, 100, 0.95, 0.02), (2.0, 0, 0.01, 0.0)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", FILTERS)
def test_top_p_and_min_p_keep_what_the_definitions_keep(temperature, top_k, top_p, min_p):
    from moshi_mlx.sampling import filter_logits

    logits = np.random.default_rng(7).standard_normal((4, 500)).astype(np.float32) * 3
    params = SamplingParams(temperature, top_k, top_p, min_p)
    got = np.array(filter_logits(mx.array(logits), params, 500))
    want = _numpy_filter(logits, temperature, top_k, top_p, min_p)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)
    assert 0 < np.isfinite(got).sum() < got.size  # each case drops some and keeps some


@pytest.mark.parametrize("params", [SamplingParams(1.0, 0, 0.6, 0.0), SamplingParams(1.0, 0, 1.0, 0.2)])
def test_compiled_sampler_draws_only_what_top_p_and_min_p_keep(params):
    logits = np.random.default_rng(3).standard_normal((1, 300)).astype(np.float32) * 2
    allowed = set(np.flatnonzero(np.isfinite(_numpy_filter(logits, 1.0, 0, params.top_p, params.min_p)[0])).tolist())
    sampler = make_sampler(params, 300)
    draws = {int(sampler(mx.array(logits), mx.random.key(i))[0]) for i in range(300)}
    assert draws <= allowed and len(draws) > 1


def test_top_p_at_one_and_min_p_at_zero_draw_as_plain_top_k():
    """The filters off leave the draws of temperature + top-k alone (token parity with earlier releases)."""
    logits = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    kth = np.sort(logits, axis=-1)[:, -10:-9]
    masked = mx.array(np.where(logits >= kth, logits, -np.inf) / 0.9)
    sampler = make_sampler(SamplingParams(0.9, 10, 1.0, 0.0), 64)
    for i in range(20):
        want = np.array(mx.random.categorical(masked, axis=-1, key=mx.random.key(i)))
        assert np.array_equal(np.array(sampler(mx.array(logits), mx.random.key(i))), want)


@pytest.mark.parametrize("kwargs", [{"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"min_p": 1.01}])
def test_top_p_and_min_p_bounds(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)
