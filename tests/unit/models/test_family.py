"""Kyutai's model family options, each checked end to end against an independent float64 NumPy forward.

For every option a random checkpoint in Kyutai's PyTorch layout goes through our converter (f32 output),
our config reader and `load_lm`, and `Lm.forward` must give the NumPy logits (tests/helpers/numpy_lm.py)
within 1e-5.
"""

from __future__ import annotations

import functools
import json

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import load_lm
from moshi_mlx.model_files.convert import convert
from moshi_mlx.models.config import LmConfig, SttConfig
from moshi_mlx.models.pytorch import ConvertError
from moshi_mlx.settings import GREEDY
from tests.helpers import numpy_lm
from tests.helpers.family import CONDITION, STEPS, VARIANTS, delayed_sequence, pytorch_checkpoint, variant_config


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    cfg = variant_config(request.param)
    rng = np.random.default_rng(sorted(VARIANTS).index(request.param))
    weights = pytorch_checkpoint(cfg, rng)
    root = tmp_path_factory.mktemp(request.param)
    mx.save_safetensors(str(root / "pt.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    (root / "config.json").write_text(json.dumps(cfg))
    out = convert(root / "pt.safetensors", root / "mlx", config=root / "config.json", dtype="f32",
                  log=lambda m: None)
    config = LmConfig.from_dict(json.loads((root / "mlx" / "config.json").read_text()))
    return request.param, cfg, weights, load_lm(out, config), rng


def _condition(model, cfg):
    """The fused condition for a conditioned variant (None otherwise), and the values it stands for."""
    if not cfg.get("conditioners"):
        return None, None
    return model.condition(CONDITION), CONDITION


def test_forward_matches_numpy_float64(variant):
    name, cfg, weights, model, rng = variant
    assert model.dtype == mx.float32
    seq = delayed_sequence(cfg, rng)
    f32 = {k: v.astype(np.float32).astype(np.float64) for k, v in weights.items()}  # what the file holds
    condition, values = _condition(model, cfg)
    want_text, want_audio = numpy_lm.forward(f32, cfg, seq, values)
    text, audio = model.forward(mx.array(seq)[None], condition)
    np.testing.assert_allclose(np.array(text[0]), want_text, rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.array(audio[0]), want_audio, rtol=0, atol=1e-5, err_msg=name)
    assert np.abs(want_text).max() > 0.5  # not a degenerate comparison
    if cfg.get("extra_heads_num_heads"):
        hidden = numpy_lm.temporal_hidden(f32, cfg, seq, values)
        t = cfg["dim"]
        ours = model.extra_head_probs(model_hidden(model, seq, condition))
        for got, want in zip(ours, numpy_lm.extra_heads(f32, cfg, hidden), strict=True):
            np.testing.assert_allclose(np.array(got[0]), want, rtol=0, atol=1e-6)
        assert t and len(ours) == cfg["extra_heads_num_heads"]


def model_hidden(model, seq: np.ndarray, condition) -> mx.array:
    """The temporal output for every position, stepped one position at a time through the KV cache."""
    cache = model.make_cache(batch=1)
    inputs = np.concatenate([np.array(model.start_tokens())[:, None], seq[:, :-1]], axis=1)
    hidden = []
    for t in range(seq.shape[1]):
        h, _ = model.temporal(mx.array(inputs[None, :, t]), cache.layers, cache.context(), condition)
        cache.position += 1
        hidden.append(h[:, 0])
    return mx.stack(hidden, axis=1)


def test_stepped_temporal_equals_teacher_forcing(variant):
    """The KV-cache path (grouped-query heads, both RoPE layouts, conditions...) gives forward's numbers."""
    _, cfg, _, model, rng = variant
    seq = delayed_sequence(cfg, rng)
    condition, _ = _condition(model, cfg)
    text, _ = model.forward(mx.array(seq)[None], condition)
    stepped = model.text_linear(model_hidden(model, seq, condition))
    np.testing.assert_allclose(np.array(stepped[0]), np.array(text[0]), rtol=0, atol=1e-5)


def test_streaming_runs_every_variant(variant):
    """Stepping LmGen gives the teacher-forced numbers for every option (positions, norms, FFNs, embeddings)."""
    _, cfg, _, model, rng = variant
    if model.config.is_conditioned or model.config.user_codebooks == 0:
        pytest.skip("LmGen's conditioning belongs to generate.py; test_lm's model has no user stream to feed")
    gen = LmGen(model, GREEDY, GREEDY, keep_text_logits=True)
    frames = rng.integers(0, cfg["card"], (STEPS, cfg["n_q"] - cfg["dep_q"])).astype(np.int32)
    raw, logits, outs = [], [], []
    for frame in frames:
        pending = gen.submit(frame)
        raw.append(pending.raw_tokens), logits.append(pending.text_logits)
        outs.append(pending.result())
    user = np.zeros((len(frames[0]), STEPS), np.int32)
    for k, delay in enumerate(cfg["delays"][1 + cfg["dep_q"] :]):
        user[k, delay:] = frames[: STEPS - delay, k]
    tokens = np.concatenate([np.stack(raw, axis=1), user])[None]
    text, audio = model.forward(mx.array(tokens))
    np.testing.assert_allclose(np.array(text[0]), np.stack(logits), rtol=0, atol=1e-4)
    if cfg["dep_q"]:
        assert np.array_equal(np.array(mx.argmax(audio[0], axis=-1)), tokens[0, 1 : 1 + cfg["dep_q"]])
    else:  # text only: every step is a complete frame holding a text token and no audio codes
        assert audio.shape == (1, 0, STEPS, cfg["card"])
        assert [o.frame for o in outs] == list(range(STEPS))
        assert all(o.audio_codes.shape == (0,) and o.text_token == r[0] for o, r in zip(outs, raw, strict=True))


def test_config_json_round_trips_the_options(variant):
    name, cfg, _, model, _ = variant
    get = functools.partial(numpy_lm.get, cfg)
    c = model.config
    assert c.transformer.norm == ("layer_norm" if get("norm").startswith("layer_norm") else "rms_norm")
    assert c.transformer.norm_eps == (1e-8 if get("norm").endswith("_f32") else 1e-5)
    assert c.transformer.positional_embedding == get("positional_embedding")
    assert c.depformer.positional_embedding == get("depformer_pos_emb")
    assert c.transformer.gating == (get("gating") == "silu")
    assert c.depformer.gating == (get("depformer_gating") == "silu")
    assert (c.transformer.kv_repeat, c.depformer.kv_repeat) == (get("kv_repeat"), get("depformer_kv_repeat"))
    assert c.transformer.layer_scale == (get("layer_scale") is not None)
    assert c.depformer.layer_scale == (get("depformer_layer_scale") is not None)
    assert c.depformer.max_period == get("depformer_max_period")
    assert c.depformer_out_norm == cfg.get("depformer_norm")
    assert c.depformer_low_rank_embeddings == cfg.get("depformer_low_rank_embeddings")
    assert c.extra_heads_num_heads == cfg.get("extra_heads_num_heads", 0)
    assert c.conditioner_names == tuple(cfg.get("conditioners") or ())
    assert c.model_type == cfg.get("model_type", "moshi") and c.mimi_name == cfg.get("mimi_name")
    assert dict(c.lm_gen_config) == cfg.get("lm_gen_config", {})
    assert c.text_only == (cfg["dep_q"] == 0)
    stt = cfg.get("stt_config")
    assert c.stt == (SttConfig(**stt) if stt else None)
    assert LmConfig.from_dict(c.to_kyutai_dict()).stt == c.stt == LmConfig.from_dict(c.to_dict()).stt
    schedule = cfg.get("depformer_weights_per_step_schedule")
    assert c.depformer_weights_per_step_schedule == (tuple(schedule) if schedule else None)
    assert LmConfig.from_dict(c.to_kyutai_dict()) == c
    assert LmConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_shared_weight_sets_need_the_schedule(tmp_path):
    cfg = variant_config("low_rank_schedule_dep_rope")
    weights = pytorch_checkpoint(cfg, np.random.default_rng(0))
    mx.save_safetensors(str(tmp_path / "pt.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    no_schedule = {k: v for k, v in cfg.items() if k != "depformer_weights_per_step_schedule"}
    with pytest.raises(ConvertError, match="depformer_weights_per_step_schedule"):
        convert(tmp_path / "pt.safetensors", tmp_path / "o", config=no_schedule, log=lambda m: None)


@pytest.mark.parametrize("name", ["hibiki_conditioned_extra_heads", "gqa_rope_concat_layer_scale_dep_norm"])
def test_the_mlx_layout_converts_again_to_the_same_model(tmp_path, name):
    """An MLX checkpoint of every new option (conditioner tables, extra heads, layer scales, key/value heads,
    depformer output norms) is read back by the plan and rewritten tensor for tensor."""
    cfg = variant_config(name)
    weights = pytorch_checkpoint(cfg, np.random.default_rng(5))
    mx.save_safetensors(str(tmp_path / "pt.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    first = convert(tmp_path / "pt.safetensors", tmp_path / "a", config=cfg, dtype="f32", log=lambda m: None)
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    again = convert(first, tmp_path / "b", config=written, dtype="f32", log=lambda m: None)
    a, b = mx.load(str(first)), mx.load(str(again))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]) for k in a)
    assert LmConfig.from_dict(json.loads((tmp_path / "b" / "config.json").read_text())) == LmConfig.from_dict(written)
