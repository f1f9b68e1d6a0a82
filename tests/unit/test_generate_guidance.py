"""Conditioning and classifier-free guidance in LmGen, on a random conditioned model in Hibiki's layout.

Random weights give random tokens: these tests check the wiring (rows, combination, cost) and that
guidance changes what is sampled, not what Hibiki would say.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.conditioning import ConditioningError
from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.model_files.stand_ins import tiny_hibiki_config
from moshi_mlx.models.config import LmConfig, config_tiny
from moshi_mlx.settings import GREEDY

STEPS = 12
#: Hibiki 1B's layout (8 + 8 codebooks, delays, the description conditioner), narrower still: fast on a CPU.
SMALL = {**tiny_hibiki_config(text_card=100), "dim": 64, "num_heads": 2, "num_layers": 1, "depformer_dim": 64,
         "depformer_num_heads": 2, "depformer_num_layers": 1, "depformer_dim_feedforward": 192}
_runs: dict[tuple, np.ndarray] = {}


@pytest.fixture(scope="module")
def hibiki():
    mx.random.seed(11)
    model = build_model(LmConfig.from_dict(SMALL), None, mx.float32)
    mx.eval(model.parameters())
    _runs.clear()
    return model


def frames(config: LmConfig, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.audio_card, (n, config.user_codebooks))


def greedy_raw(model, coef: float, condition: str | None = None, n: int = STEPS) -> np.ndarray:
    """Each step's sampled tokens (text, Moshi's codebooks) in the delayed layout: [n, 1 + K] (a fresh LmGen)."""
    key = (coef, condition, n)
    if key not in _runs:
        _runs[key] = _greedy_run(model, coef, condition, n)
    return _runs[key]


def _greedy_run(model, coef: float, condition: str | None, n: int) -> np.ndarray:
    gen = LmGen(model, GREEDY, GREEDY, seed=0, condition=condition, cfg_coef=coef)
    out = []
    for f in frames(model.config, n):
        pending = gen.submit(f)
        out.append(pending.raw_tokens)
        pending.result()
    return np.stack(out)


def test_guidance_changes_the_greedy_tokens(hibiki):
    plain, guided = greedy_raw(hibiki, 1.0), greedy_raw(hibiki, 3.0)
    differ = (plain != guided).any(axis=1)
    print(f"C=3 vs C=1, greedy: {differ.sum()} of {STEPS} steps differ (text {(plain[:, 0] != guided[:, 0]).sum()}, "
          f"audio codes {(plain[:, 1:] != guided[:, 1:]).sum()} of {plain[:, 1:].size})")
    assert differ.any()


def test_the_condition_matters_and_guidance_at_one_is_one_row(hibiki):
    assert not np.array_equal(greedy_raw(hibiki, 1.0, "very_bad"), greedy_raw(hibiki, 1.0, "very_good"))
    assert np.array_equal(greedy_raw(hibiki, 1.0, "very_good"), greedy_raw(hibiki, 1.0))  # Hibiki's default
    one, two = LmGen(hibiki, cfg_coef=1.0), LmGen(hibiki, cfg_coef=3.0)
    assert (one.rows, two.rows) == (1, 2)  # C = 1 costs one row, not two
    assert two._cache.nbytes == 2 * one._cache.nbytes


def test_reconfiguring_guidance_resizes_the_step(hibiki):
    gen = LmGen(hibiki, GREEDY, GREEDY, cfg_coef=1.0)
    gen.configure(GREEDY, GREEDY, cfg_coef=3.0)
    gen.reset()
    run = []
    for f in frames(hibiki.config, STEPS):
        pending = gen.submit(f)
        run.append(pending.raw_tokens)
        pending.result()
    assert gen.rows == 2 and np.array_equal(np.stack(run), greedy_raw(hibiki, 3.0))


def test_guided_stepping_equals_the_guided_whole_sequence(hibiki):
    """Streaming CFG agrees with Lm.forward on both rows, combined as C*l_good - (C-1)*l_bad (teacher forced
    on the streamed tokens): text and every audio codebook are the argmax of the combination."""
    cfg, coef = hibiki.config, 3.0
    raw = greedy_raw(hibiki, coef, "good")
    user_frames = frames(cfg, STEPS)
    user = np.zeros((cfg.user_codebooks, STEPS), np.int32)  # delayed layout; before a delay: anything
    for k, delay in enumerate(cfg.audio_delays[cfg.generated_codebooks :]):
        user[k, delay:] = user_frames[: STEPS - delay, k]
    tokens = mx.array(np.concatenate([raw.T, user], axis=0)[None].astype(np.int32))
    rows = [hibiki.condition({"description": v}) for v in ("good", "very_bad")]
    text, audio = hibiki.forward(mx.concatenate([tokens, tokens], axis=0), mx.concatenate(rows, axis=0))
    text, audio = np.array(text, np.float64), np.array(audio, np.float64)
    text = coef * text[0] - (coef - 1) * text[1]
    audio = coef * audio[0] - (coef - 1) * audio[1]
    assert np.array_equal(text.argmax(-1), raw[:, 0])
    assert np.array_equal(audio.argmax(-1), raw[:, 1:].T)


def test_conditions_the_model_cannot_take_are_refused(hibiki):
    mx.random.seed(0)
    moshi = build_model(config_tiny(), None, mx.float32)
    with pytest.raises(ConditioningError, match="needs a model with conditioners"):
        LmGen(moshi, cfg_coef=3.0)
    with pytest.raises(ConditioningError, match="no conditioners"):
        LmGen(moshi, condition="very_good")
    with pytest.raises(ConditioningError, match="not one of description's values"):
        LmGen(hibiki, condition="excellent")
