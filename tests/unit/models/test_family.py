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
from moshi_mlx.models.config import LmConfig
from moshi_mlx.models.pytorch import ConvertError
from moshi_mlx.settings import GREEDY
from tests.helpers import numpy_lm

BASE = dict(
    dim=64, num_heads=4, num_layers=2, hidden_scale=4.125, context=5, max_period=10_000,
    positional_embedding="rope", norm="rms_norm_f32", gating="silu",
    text_card=40, card=24, n_q=6, dep_q=3, delays=[0, 0, 1, 1, 0, 1, 1],
    depformer_dim=32, depformer_num_heads=2, depformer_num_layers=2, depformer_dim_feedforward=128,
    depformer_multi_linear=True, depformer_weights_per_step=True, depformer_pos_emb="none",
    depformer_max_period=10_000, causal=True, layer_scale=None,
)
DESCRIPTION = {"type": "lut", "lut": {"n_bins": 31, "dim": 16, "tokenizer": "noop",
                                      "possible_values": ["very_bad", "bad", "neutral", "good", "very_good"]}}
VARIANTS = {
    "moshi": {},
    "layer_norm_sin_gelu": dict(
        norm="layer_norm", positional_embedding="sin", gating="none", hidden_scale=3,
        depformer_weights_per_step=False, depformer_dim_feedforward=96, depformer_pos_emb="sin",
    ),
    "low_rank_schedule_dep_rope": dict(
        depformer_low_rank_embeddings=16, depformer_weights_per_step_schedule=[0, 1, 1], depformer_pos_emb="rope",
        positional_embedding="none", norm="rms_norm",
    ),
    "single_depformer_in": dict(depformer_multi_linear=False, norm="layer_norm_f32", depformer_pos_emb="sin"),
    # Hibiki-Zero's options: grouped-query attention (inherited by the depformer), non-interleaved RoPE, layer
    # scales (inherited too), a norm on each depformer output.
    "gqa_rope_concat_layer_scale_dep_norm": dict(
        kv_repeat=2, positional_embedding="rope_concat", layer_scale=0.01, depformer_pos_emb="rope_concat",
        depformer_norm="rms_norm_f32", depformer_max_period=100,
    ),
    # Hibiki's layout scaled down: 2 x dep_q streams with delays of 2, a summed `description` condition,
    # extra heads, max period 100000; the depformer overrides kv_repeat and layer_scale it would inherit.
    "hibiki_conditioned_extra_heads": dict(
        n_q=8, dep_q=4, delays=[0, 0, 2, 2, 2, 0, 2, 2, 2], max_period=100_000, conditioners={"description": DESCRIPTION},
        fuser={"sum": ["description"]}, extra_heads_num_heads=2, extra_heads_dim=6, kv_repeat=2,
        depformer_kv_repeat=1, layer_scale=0.01, depformer_layer_scale=None, lm_gen_config={"temp": 0.8},
        model_type="hibiki", mimi_name="mimi.safetensors",
    ),
    "sin_rope_scaled_dep_gelu": dict(
        positional_embedding="sin_rope", positional_scale=0.5, depformer_pos_emb="sin_rope",
        depformer_gating="none", depformer_weights_per_step=False, depformer_dim_feedforward=96,
        depformer_positional_scale=2.0,
    ),
    # moshi/tests/test_lm.py's model, as Kyutai writes it: every other key at LMModel's default (layer_norm,
    # sin positions, plain GELU temporal FFN; the depformer silu-gated, low-rank, schedule [0, 1, 1]).
    "kyutai_test_lm": "replace",
}
KYUTAI_TEST_LM = dict(
    delays=[0, 1, 2, 4], n_q=3, dep_q=3, card=32, text_card=48, dim=16, num_layers=2, num_heads=1, hidden_scale=1,
    depformer_dim=16, depformer_multi_linear=True, depformer_weights_per_step=True,
    depformer_weights_per_step_schedule=[0, 1, 1], depformer_low_rank_embeddings=8, depformer_num_heads=1,
    depformer_gating="silu", context=4,
)
STEPS = 8  # > context: the attention window matters too
CONDITION = {"description": "very_good"}


def variant_config(name: str) -> dict:
    return dict(KYUTAI_TEST_LM) if VARIANTS[name] == "replace" else {**BASE, **VARIANTS[name]}


def pytorch_checkpoint(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float64 tensors named and shaped as Kyutai's LMModel.state_dict() for `cfg`."""
    get = functools.partial(numpy_lm.get, cfg)
    d, D, dep_q, n_q = cfg["dim"], cfg["depformer_dim"], cfg["dep_q"], cfg["n_q"]
    gated, dep_gated = get("gating") != "none", get("depformer_gating") != "none"

    def kyutai_hidden(n: int, ff: int, on: bool) -> int:  # modules/gating.py's rule
        return (21 * n // 8 if ff == 4 * n else 2 * ff // 3) if on else ff

    hidden = kyutai_hidden(d, int(cfg["hidden_scale"] * d), gated)
    dep_ff = cfg.get("depformer_dim_feedforward") or int(cfg["hidden_scale"] * D)
    dep_hidden = kyutai_hidden(D, dep_ff, dep_gated)
    schedule = cfg.get("depformer_weights_per_step_schedule")
    per_step = get("depformer_weights_per_step")
    sets = (max(schedule) + 1 if schedule else dep_q) if per_step else 1
    n_in = (max(schedule) + 1 if schedule else dep_q) if get("depformer_multi_linear") else 1
    rank = cfg.get("depformer_low_rank_embeddings")
    kv = d // get("kv_repeat")
    dep_kv = D // get("depformer_kv_repeat")
    w: dict[str, tuple] = {}

    def norm(name: str, n: int, kind: str = get("norm")) -> None:
        if kind.startswith("layer_norm"):
            w[f"{name}.weight"], w[f"{name}.bias"] = (n,), (n,)
        else:
            w[f"{name}.alpha"] = (1, 1, n)

    def ffn(prefix: str, gating_prefix: str, n: int, h: int, on: bool) -> None:
        if on:
            w[f"{gating_prefix}.linear_in.weight"], w[f"{gating_prefix}.linear_out.weight"] = (2 * h, n), (n, h)
        else:
            w[f"{prefix}.linear1.weight"], w[f"{prefix}.linear2.weight"] = (h, n), (n, h)

    def emb(name: str, vocab: int) -> None:
        w[f"{name}.weight"] = (vocab, rank or D)
        if rank:
            w[f"{name}.low_rank.weight"] = (D, rank)

    w["text_emb.weight"], w["text_linear.weight"] = (cfg["text_card"] + 1, d), (cfg["text_card"], d)
    for i in range(n_q):
        w[f"emb.{i}.weight"] = (cfg["card"] + 1, d)
    norm("out_norm", d)
    for l in range(cfg["num_layers"]):
        p = f"transformer.layers.{l}"
        w[f"{p}.self_attn.in_projs.0.weight"], w[f"{p}.self_attn.out_projs.0.weight"] = (d + 2 * kv, d), (d, d)
        norm(f"{p}.norm1", d), norm(f"{p}.norm2", d)
        ffn(p, f"{p}.gating", d, hidden, gated)
        if get("layer_scale") is not None:
            w[f"{p}.layer_scale_1.scale"] = w[f"{p}.layer_scale_2.scale"] = (d,)
    for i in range(n_in):
        w[f"depformer_in.{i}.weight"] = (D, d)
    emb("depformer_text_emb", cfg["text_card"] + 1)
    for k in range(dep_q):
        w[f"linears.{k}.weight"] = (cfg["card"], D)
        if k:
            emb(f"depformer_emb.{k - 1}", cfg["card"] + 1)
        if cfg.get("depformer_norm"):
            norm(f"depformer_norms.{k}", D, cfg["depformer_norm"])
    for l in range(get("depformer_num_layers")):
        p = f"depformer.layers.{l}"
        for j in range(sets):
            w[f"{p}.self_attn.in_projs.{j}.weight"] = (D + 2 * dep_kv, D)
            w[f"{p}.self_attn.out_projs.{j}.weight"] = (D, D)
            if dep_gated and per_step:
                ffn(p, f"{p}.gating.{j}", D, dep_hidden, True)
        if not (dep_gated and per_step):
            ffn(p, f"{p}.gating", D, dep_hidden, dep_gated)
        norm(f"{p}.norm1", D), norm(f"{p}.norm2", D)
        if get("depformer_layer_scale") is not None:
            w[f"{p}.layer_scale_1.scale"] = w[f"{p}.layer_scale_2.scale"] = (D,)
    for i in range(cfg.get("extra_heads_num_heads", 0)):
        w[f"extra_heads.{i}.weight"] = (cfg["extra_heads_dim"], d)
    for name, spec in (cfg.get("conditioners") or {}).items():
        p = f"condition_provider.conditioners.{name}"
        w[f"{p}.embed.weight"] = (spec["lut"]["n_bins"] + 1, spec["lut"]["dim"])
        w[f"{p}.output_proj.weight"] = (d, spec["lut"]["dim"])
        w[f"{p}.learnt_padding"] = (1, 1, d)
    out = {}
    for name, shape in sorted(w.items()):
        if name.endswith(".alpha") or (name.endswith(".weight") and "norm" in name) or name.endswith(".scale"):
            out[name] = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            out[name] = 0.3 * rng.standard_normal(shape)
        else:
            fan_in = shape[-1] if "emb" not in name or "low_rank" in name else 1
            out[name] = rng.standard_normal(shape) / np.sqrt(fan_in)
    return out


def delayed_sequence(cfg: dict, rng: np.random.Generator) -> np.ndarray:
    """Random codes in the delayed layout, the start token where a stream has no frame yet."""
    seq = np.concatenate([
        rng.integers(0, cfg["text_card"], (1, STEPS)), rng.integers(0, cfg["card"], (cfg["n_q"], STEPS))
    ])
    for k, delay in enumerate(cfg["delays"]):
        seq[k, :delay] = cfg["text_card"] if k == 0 else cfg["card"]
    return seq.astype(np.int32)


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
    raw, logits = [], []
    for frame in frames:
        pending = gen.submit(frame)
        raw.append(pending.raw_tokens), logits.append(pending.text_logits)
        pending.result()
    user = np.zeros((len(frames[0]), STEPS), np.int32)
    for k, delay in enumerate(cfg["delays"][1 + cfg["dep_q"] :]):
        user[k, delay:] = frames[: STEPS - delay, k]
    tokens = np.concatenate([np.stack(raw, axis=1), user])[None]
    text, audio = model.forward(mx.array(tokens))
    np.testing.assert_allclose(np.array(text[0]), np.stack(logits), rtol=0, atol=1e-4)
    assert np.array_equal(np.array(mx.argmax(audio[0], axis=-1)), tokens[0, 1 : 1 + cfg["dep_q"]])


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
