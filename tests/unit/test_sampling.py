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
