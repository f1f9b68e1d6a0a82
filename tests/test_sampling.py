import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.sampling import GREEDY, SamplingParams, make_sampler


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
