"""Streaming parity with Kyutai's PyTorch LMGen (moshi 0.2.13) on a scaled-down speech-to-text model.

tests/fixtures/kyutai/make_fixtures.py built a text-only model (dep_q 0, 32 codebooks, every delay 0, four extra
heads) with random weights through Kyutai's own loader and stepped `LMGen(use_sampling=False)` with
`step_with_extra_heads` for 48 steps on random codes. Here the same state dict goes through our converter (f32)
and our `LmGen(extra_heads=True)` steps it greedily.

Step alignment (the fixture's `model_inputs` show it, see tests/fixtures/kyutai/README.md): PyTorch's step t
reads the codes given at that same step t (the start tokens at step 0, so the codes of step 0 are never read);
ours reads the codes given at step t - 1 (Kyutai's MLX and Rust convention). Our step t is given
`user_codes[t + 1]`, so both read `user_codes[t]` at step t (start tokens at step 0), for t = 0 .. 46: 47 steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from moshi_mlx.generate import LmGen
from moshi_mlx.models.config import SttConfig
from moshi_mlx.settings import GREEDY
from tests.helpers.kyutai import FIXTURES, convert_fixture

FOLDER = FIXTURES / "stt"
HEADS_TOLERANCE = 1e-4
MIN_STEPS = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Our greedy steps on the fixture: (expected, our text tokens, our extra heads [S-1, heads, dim], logits)."""
    expected = load_file(str(FOLDER / "expected.safetensors"))
    model, written = convert_fixture(FOLDER, tmp_path_factory.mktemp("stt"))
    gen = LmGen(model, GREEDY, GREEDY, extra_heads=True, keep_text_logits=True)
    user = expected["user_codes"].astype(np.int32)
    tokens, heads, logits = [], [], []
    for t in range(user.shape[0] - 1):
        pending = gen.submit(user[t + 1])
        heads.append(np.stack(pending.extra_heads))
        logits.append(pending.text_logits)
        out = pending.result()
        assert out.frame == t and out.audio_codes.shape == (0,)
        tokens.append(out.text_token)
    return expected, written, np.array(tokens), np.stack(heads), np.stack(logits)


def test_fixture_is_kyutais_stt_layout():
    config = json.loads((FOLDER / "config.json").read_text(encoding="utf-8"))
    meta = json.loads((FOLDER / "meta.json").read_text(encoding="utf-8"))
    assert meta["moshi"] == "0.2.13" and meta["dtype"] == "f32"
    assert config["dep_q"] == 0 and config["n_q"] == 32 and set(config["delays"]) == {0}
    assert config["extra_heads_num_heads"] >= 3  # Kyutai's scripts read head 2
    expected = load_file(str(FOLDER / "expected.safetensors"))
    steps = meta["steps"]
    assert expected["extra_heads"].shape == (steps, config["extra_heads_num_heads"], config["extra_heads_dim"])
    # The alignment stated above: PyTorch's step t read the start tokens at t = 0, else the codes given at t.
    inputs = expected["model_inputs"][:, 0]
    assert (inputs[0] == [config["text_card"]] + [config["card"]] * 32).all()
    assert (inputs[1:, 1:] == expected["user_codes"][1:]).all()
    assert (inputs[1:, 0] == expected["text_tokens"][:-1]).all()


def test_converted_config_keeps_stt_config(run):
    _, written, *_ = run
    assert written["dep_q"] == 0 and written["model_type"] == "stt"
    assert SttConfig(**written["stt_config"]) == SttConfig(0.5, 0.0)


def test_greedy_text_tokens_are_pytorchs(run):
    expected, _, tokens, _, logits = run
    steps = len(tokens)
    assert steps >= MIN_STEPS
    assert np.array_equal(tokens, expected["text_tokens"][:steps])
    assert len(set(tokens.tolist())) > 10  # the tokens follow the input: not a constant stream
    assert float(np.abs(logits - expected["text_logits"][:steps]).max()) <= 1e-4


def test_extra_heads_match_pytorch(run):
    expected, _, _, heads, _ = run
    want = expected["extra_heads"][: len(heads)]
    assert float(np.abs(heads - want).max()) <= HEADS_TOLERANCE
    np.testing.assert_allclose(heads.sum(-1), 1.0, atol=1e-5)
