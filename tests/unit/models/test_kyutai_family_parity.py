"""Teacher-forced parity with Kyutai's PyTorch LMModel (moshi 0.2.13), one scaled-down model per family.

tests/fixtures/kyutai/make_fixtures.py (run by hand in a side venv with torch 2.13 and moshi 0.2.13) built
each model with random weights through Kyutai's own loader from a config.json in Kyutai's keys, and
recorded LMModel.forward on random codes. Here the same config.json and state dict go through our
converter (f32) and loader, and our `Lm.forward` must give the same text and audio logits within 1e-4.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers.kyutai import FIXTURES, convert_fixture, delayed, max_gap, undelayed

TOLERANCE = 1e-4
FAMILIES = {  # fixture folder -> the Kyutai options it carries (what a failure points at)
    "moshi_7b": {"gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope"},
    "hibiki_2b": {"n_q": 32, "dep_q": 16, "max_period": 100000, "fuser": {"sum": ["description"]}},
    "kv_repeat": {"kv_repeat": 2},
    "rope_concat": {"positional_embedding": "rope_concat", "depformer_pos_emb": "rope_concat"},
    "depformer_norm": {"depformer_norm": "layer_norm", "extra_heads_num_heads": 2},
    "depformer_rms_norm": {"depformer_norm": "rms_norm_f32"},
}


def _read(name: str) -> tuple[dict, dict, dict]:
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return config, meta, load_file(str(folder / "expected.safetensors"))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fixture_is_a_kyutai_recording_with_its_options(name):
    config, meta, expected = _read(name)
    assert meta["moshi"] == "0.2.13" and meta["dtype"] == "f32"
    assert FAMILIES[name].items() <= config.items()
    batch, streams, steps = expected["codes"].shape
    assert streams == 1 + config["n_q"] and steps > max(config["delays"])
    assert expected["logits"].shape == (batch, config["dep_q"], steps, config["card"])
    assert np.isfinite(expected["logits"][expected["mask"]]).all()


def _condition(model, meta: dict):
    """One summed condition per batch row, as the fixture's meta.json lists them (None if unconditioned)."""
    values = meta["conditions"]
    if not values:
        return None
    (name, rows), = values.items()
    return mx.concatenate([model.condition({name: v}) for v in rows], axis=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_teacher_forced_logits_match_pytorch(name, tmp_path):
    config, meta, expected = _read(name)
    model, _ = convert_fixture(FIXTURES / name, tmp_path)
    delays, dep_q = config["delays"], config["dep_q"]
    start = [config["text_card"]] + [config["card"]] * config["n_q"]
    tokens = mx.array(delayed(expected["codes"], delays, start).astype(np.int32))
    condition = _condition(model, meta)
    text, audio = model.forward(tokens, **({} if condition is None else {"condition": condition}))
    audio, mask = undelayed(np.array(audio), delays[1 : 1 + dep_q])
    text, text_mask = undelayed(np.array(text)[:, None], delays[:1])
    np.testing.assert_array_equal(mask, expected["mask"])
    np.testing.assert_array_equal(text_mask, expected["text_mask"])
    assert max_gap(text, expected["text_logits"], text_mask) <= TOLERANCE
    assert max_gap(audio, expected["logits"], mask) <= TOLERANCE
