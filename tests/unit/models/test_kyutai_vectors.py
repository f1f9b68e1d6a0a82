"""Kyutai's own test vectors (moshi/tests/test_lm.py of kyutai-labs/moshi, moshi 0.2.13), through our code.

The model of test_lm.py (LayerNorm with bias, sinusoidal positions, a GELU MLP in the temporal transformer,
SiLU gating in the depformer, low-rank depformer embeddings, weights-per-step schedule [0, 1, 1]) is
written in tests/fixtures/kyutai/test_lm/config.json with test_lm.py's arguments in Kyutai's keys; keys it
leaves out mean LMModel's defaults. Its state dict goes through our converter (f32), our loader and our
teacher-forced `Lm.forward`, and must meet test_lm.py's own criterion (per-codebook mean cross-entropy
within 1e-6 relative) and max |logit - expected| <= 1e-5.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers.kyutai import FIXTURES, codebook_ce_delta, convert_fixture, delayed, max_gap, undelayed

FOLDER = FIXTURES / "test_lm"
CE_RELATIVE = 1e-6  # test_lm.py's own bound
LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    model, _ = convert_fixture(FOLDER, tmp_path_factory.mktemp("test_lm"), weights="test_lm_model.safetensors")
    kyutai = json.loads((FOLDER / "config.json").read_text(encoding="utf-8"))
    codes = load_file(str(FOLDER / "test_lm_codes.safetensors"))["codes"]
    ref = load_file(str(FOLDER / "test_lm_out.safetensors"))
    delays = kyutai["delays"]
    start = [kyutai["text_card"]] + [kyutai["card"]] * kyutai["n_q"]
    text, audio = model.forward(mx.array(delayed(codes, delays, start).astype(np.int32)))
    dep_q = kyutai["dep_q"]
    audio, mask = undelayed(np.array(audio), delays[1 : 1 + dep_q])
    text, text_mask = undelayed(np.array(text)[:, None], delays[:1])
    return codes, ref, audio, mask, text, text_mask, dep_q


def test_fixture_is_kyutais_recording():
    """The committed files are test_lm.py's assets (shapes as its assertions state them)."""
    codes = load_file(str(FOLDER / "test_lm_codes.safetensors"))["codes"]
    ref = load_file(str(FOLDER / "test_lm_out.safetensors"))
    assert codes.shape == (3, 4, 7)
    assert ref["logits"].shape == (3, 3, 7, 32) and ref["text_logits"].shape == (3, 1, 7, 48)
    assert np.isnan(ref["logits"][~ref["mask"]]).all()


def test_masks_match_kyutais(scored):
    _, ref, _, mask, _, text_mask, _ = scored
    np.testing.assert_array_equal(mask, ref["mask"])
    np.testing.assert_array_equal(text_mask, ref["text_mask"])


def test_audio_logits_meet_test_lm_criterion(scored):
    codes, ref, audio, mask, _, _, dep_q = scored
    targets = codes[:, 1 : 1 + dep_q]
    assert codebook_ce_delta(audio, ref["logits"], targets, mask) <= CE_RELATIVE
    assert max_gap(audio, ref["logits"], mask) <= LOGIT_ATOL


def test_text_logits_meet_test_lm_criterion(scored):
    codes, ref, _, _, text, text_mask, _ = scored
    assert codebook_ce_delta(text, ref["text_logits"], codes[:, :1], text_mask) <= CE_RELATIVE
    assert max_gap(text, ref["text_logits"], text_mask) <= LOGIT_ATOL
