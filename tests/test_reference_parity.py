"""Token-for-token parity with Kyutai's moshi-mlx 0.3.0 on a committed fixture.

tests/fixtures/make_reference_fixture.py (run by hand in a venv with the reference) wrote random
micro weights in the published MLX layout and recorded the reference's greedy generation. Here the
same file goes through our loader and our LmGen: every step's tokens must be identical and the f32
logits within 1e-4 (different MLX versions round differently in the last bits).
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import load_lm
from moshi_mlx.settings import GREEDY
from tests.helpers.reference import fixture_config

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4




@pytest.fixture(scope="module")
def reference():
    record = dict(np.load(FIXTURES / "reference_lm.npz"))
    meta = json.loads(str(record.pop("meta")))
    config = fixture_config(meta["sizes"], meta["audio_delays"])
    model = load_lm(FIXTURES / "reference_lm.safetensors", config)
    assert model.dtype == mx.float32  # an f32 checkpoint stays f32 unless a dtype is asked for
    return model, record, meta


def test_fixture_is_a_real_recording(reference):
    _, record, meta = reference
    assert meta["moshi_mlx"] == "0.3.0" and meta["dtype"] == "f32"
    assert record["tokens"].shape == (meta["steps"], 9) and meta["steps"] >= 40
    # Greedy tokens vary: a constant stream would make the comparison weak.
    assert len(np.unique(record["tokens"][:, 0])) > 3 and len(np.unique(record["tokens"][:, 1:])) > 20


def test_greedy_generation_matches_the_reference_every_step(reference):
    model, record, _ = reference
    gen = LmGen(model, GREEDY, GREEDY, keep_text_logits=True)
    for step, user in enumerate(record["user_codes"]):
        pending = gen.submit(user)
        np.testing.assert_array_equal(pending.raw_tokens, record["tokens"][step], err_msg=f"step {step}")
        np.testing.assert_allclose(
            pending.text_logits, record["text_logits"][step], rtol=0, atol=TOLERANCE, err_msg=f"step {step}"
        )
        pending.result()


def test_teacher_forced_forward_gives_the_reference_logits(reference):
    """The reference's own token sequence, scored in one call: text and audio logits of every step."""
    model, record, meta = reference
    cfg = model.config
    steps = meta["steps"]
    user = np.zeros((cfg.user_codebooks, steps), np.int32)
    for k, delay in enumerate(cfg.audio_delays[cfg.generated_codebooks :]):
        user[k, delay:] = record["user_codes"][: steps - delay, k]
    tokens = np.concatenate([record["tokens"].T, user], axis=0)[None]
    text_logits, audio_logits = model.forward(mx.array(tokens))
    np.testing.assert_allclose(np.array(text_logits[0]), record["text_logits"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(
        np.array(audio_logits[0]).transpose(1, 0, 2), record["audio_logits"], rtol=0, atol=TOLERANCE
    )
