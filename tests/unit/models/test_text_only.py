"""Text-only models (Kyutai's speech-to-text layout: `dep_q` 0, 32 codebooks of the speaker, no delays).

The config reader takes `dep_q: 0` and `stt_config`; `Lm` has no depformer slice; `LmGen` steps the model and
hands out text tokens (and, on request, the extra heads' probabilities) with no audio codes. The numbers are
checked against the independent float64 NumPy forward of tests/helpers/numpy_lm.py on a random checkpoint in
Kyutai's PyTorch layout (converted by our converter, as a user would).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import build_model, load_lm
from moshi_mlx.model_files.convert import convert
from moshi_mlx.models.config import ConfigError, LmConfig, SttConfig, config_tiny_stt, read_kyutai_config
from moshi_mlx.models.pytorch import ConvertError
from moshi_mlx.settings import GREEDY
from tests.helpers import numpy_lm
from tests.helpers.family import pytorch_checkpoint, variant_config

STT = "stt_text_only"
STEPS = 12  # > the variant's context (5): the attention window matters


@pytest.fixture(scope="module")
def stt(tmp_path_factory):
    """(Kyutai config, float64 weights as stored in f32, our converted Lm)."""
    cfg = variant_config(STT)
    weights = pytorch_checkpoint(cfg, np.random.default_rng(22))
    root = tmp_path_factory.mktemp("stt")
    mx.save_safetensors(str(root / "pt.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    out = convert(root / "pt.safetensors", root / "mlx", config=cfg, dtype="f32", log=lambda m: None)
    config = LmConfig.from_dict(json.loads((root / "mlx" / "config.json").read_text()))
    f32 = {k: v.astype(np.float32).astype(np.float64) for k, v in weights.items()}
    return cfg, f32, load_lm(out, config)


def test_kyutai_stt_config_is_read_and_exposed():
    cfg = read_kyutai_config(variant_config(STT))
    assert cfg.text_only and cfg.generated_codebooks == 0 and cfg.user_codebooks == 32
    assert cfg.audio_delays == (0,) * 32 and cfg.max_delay == 0 and cfg.mimi_codebooks == 32
    assert cfg.stt == SttConfig(audio_delay_seconds=0.5, audio_silence_prefix_seconds=0.0)
    assert cfg.model_type == "stt"
    # Kyutai's stt_2.6b_en.json overlay: 2.5 s of delay, 1 s of silence before the speech.
    stt26 = read_kyutai_config({**variant_config(STT), "stt_config": {"audio_delay_seconds": 2.5,
                                                                      "audio_silence_prefix_seconds": 1.0}})
    assert stt26.stt == SttConfig(2.5, 1.0)
    assert read_kyutai_config(variant_config("moshi")).stt is None


def test_text_only_config_needs_no_depformer_keys():
    """LMModel never reads a text-only model's depformer keys, so a config.json may leave them out."""
    cfg = {k: v for k, v in variant_config(STT).items() if not k.startswith("depformer")}
    assert read_kyutai_config(cfg).text_only


@pytest.mark.parametrize("bad, message", [
    ({"stt_config": {"audio_delay_seconds": -1}}, "stt_config.audio_delay_seconds"),
    ({"stt_config": {"audio_delay_seconds": "half"}}, "stt_config.audio_delay_seconds"),
    ({"stt_config": {"audio_delay": 0.5}}, "stt_config.audio_delay is not known"),
    ({"stt_config": [0.5]}, "stt_config=.*JSON object"),
    ({"dep_q": 33}, "dep_q must be in 0..32"),
])
def test_bad_stt_configs_are_refused_in_one_line(bad, message):
    with pytest.raises(ConfigError, match=message) as err:
        read_kyutai_config({**variant_config(STT), **bad})
    assert "\n" not in str(err.value)


def test_nested_form_round_trips_stt():
    cfg = config_tiny_stt()
    back = LmConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.stt == cfg.stt and back.text_only


def test_text_only_lm_has_no_depformer_tensors():
    model = build_model(config_tiny_stt(), None, mx.float32)
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert not any(n.startswith("depformer") for n in names)
    assert {f"extra_heads.{i}.weight" for i in range(4)} <= names and len(model.audio_embs) == 32


def test_lmgen_steps_text_only_against_numpy(stt):
    """Greedy LmGen on random speaker codes: each step's text logits and extra heads equal the NumPy forward of
    the sequence it built (its own text tokens, the speaker's frame t - 1 read at step t), and its outputs are
    every step's text token with no audio codes."""
    cfg, w, model = stt
    rng = np.random.default_rng(3)
    frames = rng.integers(0, cfg["card"], (STEPS, cfg["n_q"])).astype(np.int32)
    gen = LmGen(model, GREEDY, GREEDY, keep_text_logits=True, extra_heads=True)
    logits, heads, outs = [], [], []
    for frame in frames:
        pending = gen.submit(frame)
        logits.append(pending.text_logits)
        heads.append(pending.extra_heads)
        outs.append(pending.result())
    text = np.array([o.text_token for o in outs])
    assert [o.frame for o in outs] == list(range(STEPS))
    assert all(o.audio_codes.shape == (0,) for o in outs)
    seq = np.concatenate([text[None], frames.T])  # delayed layout = undelayed: every delay is 0
    want_text, want_audio = numpy_lm.forward(w, cfg, seq)
    assert want_audio.shape == (0, STEPS, cfg["card"])
    np.testing.assert_allclose(np.stack(logits), want_text, rtol=0, atol=1e-4)
    assert np.array_equal(text, want_text.argmax(-1))
    want_heads = numpy_lm.extra_heads(w, cfg, numpy_lm.temporal_hidden(w, cfg, seq))
    for i, want in enumerate(want_heads):
        np.testing.assert_allclose(np.stack([h[i] for h in heads]), want, rtol=0, atol=1e-5)
    assert len(set(text.tolist())) > 1  # the tokens depend on the input: not a degenerate comparison


def test_lmgen_without_extra_heads_hands_none(stt):
    _, _, model = stt
    pending = LmGen(model, GREEDY, GREEDY).submit(np.zeros(32, np.int32))
    assert pending.extra_heads is None
    assert pending.result().audio_codes.shape == (0,)


def test_text_only_checkpoint_converts_without_a_config(tmp_path):
    """No config.json: the shapes say text only; delays are assumed all 0 (said in a note), the unused
    depformer_in projection is dropped, and the model loads."""
    cfg = {**variant_config(STT), "dim": 128, "num_heads": 1}  # head dim 128: Moshi's, assumed without config
    weights = pytorch_checkpoint(cfg, np.random.default_rng(1))
    assert "depformer_in.0.weight" in weights  # LMModel's stray projection (no depformer_multi_linear)
    mx.save_safetensors(str(tmp_path / "pt.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    lines: list[str] = []
    out = convert(tmp_path / "pt.safetensors", tmp_path / "mlx", dtype="f32", log=lines.append)
    written = LmConfig.from_dict(json.loads((tmp_path / "mlx" / "config.json").read_text()))
    assert written.text_only and written.audio_delays == (0,) * 32
    assert any("delays all 0" in line for line in lines)
    assert not any(k.startswith("depformer") for k in mx.load(str(out)))
    assert load_lm(out, written).config.extra_heads_num_heads == 4


def test_depformer_layers_without_heads_are_refused(tmp_path):
    weights = pytorch_checkpoint(variant_config("moshi"), np.random.default_rng(1))
    torn = {k: mx.array(v.astype(np.float32)) for k, v in weights.items() if not k.startswith("linears.")}
    mx.save_safetensors(str(tmp_path / "pt.safetensors"), torn)
    with pytest.raises(ConvertError, match="without their output heads"):
        convert(tmp_path / "pt.safetensors", tmp_path / "mlx", dtype="f32", log=lambda m: None)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_stand_in_stt_checkpoints_in_every_precision(tmp_path, bits):
    """Random STT checkpoints in the published MLX layout (bf16, q8, q4) load strictly and step."""
    from moshi_mlx.model_files.stand_ins import write_random_lm

    weights, config_path = write_random_lm(config_tiny_stt(), bits, tmp_path)
    config = LmConfig.from_dict(json.loads(config_path.read_text()))
    assert config.stt == SttConfig(0.5, 0.0) and config.text_only
    model = load_lm(weights, config)
    out = LmGen(model, GREEDY, GREEDY).step(np.zeros(32, np.int32))
    assert out.audio_codes.shape == (0,) and 0 <= out.text_token < 8000


def test_kyutai_stt_overlays_are_read():
    """Kyutai's configs/stt_1b_enfr.json and stt_2.6b_en.json (kyutai-labs/moshi) are overlays of the checkpoint's
    own config.json: their keys (lm_gen_config, model_type, stt_config, mimi_name, tokenizer_name, 33 zero
    delays, "fuser": null) on a full set of Kyutai's LMModel keys (the depformer's left in, unused) are accepted."""
    base = {**variant_config("moshi"), "n_q": 32, "dep_q": 0, "card": 2048, "text_card": 8000, "depformer_context": 8,
            "cross_attention": False, "conditioners": {}, "extra_heads_num_heads": 4, "extra_heads_dim": 6}
    overlays = {
        "stt_1b_enfr": {"stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
                        "tokenizer_name": "tokenizer_en_fr_audio_8000.model"},
        "stt_2.6b_en": {"stt_config": {"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0},
                        "tokenizer_name": "tokenizer_en_audio_4000.model"},
    }
    for name, overlay in overlays.items():
        cfg = read_kyutai_config({
            **base, "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
            "model_type": "stt", "mimi_name": "mimi-pytorch-e351c8d8@125.safetensors", "delays": [0] * 33,
            "fuser": None, **overlay,
        })
        assert cfg.text_only and cfg.mimi_codebooks == 32 and cfg.model_type == "stt", name
        assert cfg.stt == SttConfig(**overlay["stt_config"]), name
