"""Classifier-free guidance against Kyutai's PyTorch LMGen (the `cfg` fixture of tests/fixtures/kyutai/).

The fixture ran LMGen greedy with cfg_coef 3 (rows: very_good, very_bad) and with cfg_coef 1 on the scaled
Hibiki 2B model (`hibiki_2b`), recording every step's sampled tokens and the column its temporal transformer
read. Alignment convention (the fixture's README): PyTorch's step t reads the user frame it was given at step
t - delay; ours reads frame t - 1 - delay. So our step t is given PyTorch's frame t + 1, and our step t's tokens
are compared with PyTorch's step t, for t = 0 .. S - 2 (29 steps); the input columns are checked first.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from moshi_mlx.generate import LmGen
from moshi_mlx.settings import GREEDY
from tests.helpers.kyutai import FIXTURES, convert_fixture

CFG = FIXTURES / "cfg"


@pytest.fixture(scope="module")
def hibiki(tmp_path_factory):
    lm, _ = convert_fixture(FIXTURES / "hibiki_2b", tmp_path_factory.mktemp("hibiki_2b"))
    return lm


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return load_file(str(CFG / "expected.safetensors"))


def _ours(lm, user: np.ndarray, coef: float, condition: str) -> tuple[np.ndarray, np.ndarray]:
    """Our greedy steps on PyTorch's user frames shifted by one: (sampled tokens [S-1, 1+K], inputs [S-1, 33])."""
    gen = LmGen(lm, GREEDY, GREEDY, seed=0, condition=condition, cfg_coef=coef)
    inputs: list[np.ndarray] = []
    temporal = lm.temporal

    def spy(tokens, caches, ctx, cond=None):
        inputs.append(np.array(tokens)[0])
        return temporal(tokens, caches, ctx, cond)

    lm.temporal = spy
    try:
        sampled = []
        for frame in user[1:]:
            pending = gen.submit(frame)
            sampled.append(pending.raw_tokens)
            pending.result()
    finally:
        del lm.temporal
    return np.stack(sampled), np.stack(inputs)


@pytest.mark.parametrize("run,coef", [("cfg3", 3.0), ("cfg1", 1.0)])
def test_greedy_tokens_equal_pytorch_lmgen(hibiki, expected, run, coef):
    meta = json.loads((CFG / "meta.json").read_text())
    assert meta["cfg_coef"] == 3.0 and meta["condition"] == {"description": "very_good"}
    user = expected["user_codes"]
    ours, inputs = _ours(hibiki, user, coef, meta["condition"]["description"])
    steps = len(ours)
    assert steps == user.shape[0] - 1 >= 20
    # Same alignment first: every input column, on every CFG row (PyTorch's rows are identical).
    theirs_in = expected[f"{run}.model_inputs"][:steps]
    assert np.array_equal(inputs, theirs_in[:, 0]) and (theirs_in == theirs_in[:, :1]).all()
    text, audio = expected[f"{run}.text_tokens"][:steps], expected[f"{run}.audio_tokens"][:steps]
    same = (ours[:, 0] == text) & (ours[:, 1:] == audio).all(axis=1)
    print(f"{run}: {same.sum()} of {steps} steps identical to PyTorch LMGen (text and all 16 codebooks)")
    assert same.all(), np.flatnonzero(~same)


def test_guidance_changes_pytorchs_tokens_too(expected):
    """Sanity of the fixture itself: cfg_coef 3 and 1 differ, so the parity above is not vacuous."""
    assert (expected["cfg3.text_tokens"] != expected["cfg1.text_tokens"]).any()
    assert (expected["cfg3.audio_tokens"] != expected["cfg1.audio_tokens"]).any()
