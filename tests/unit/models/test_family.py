"""Kyutai's model family options, each checked end to end against an independent float64 NumPy forward.

For every option a random checkpoint in Kyutai's PyTorch layout goes through our converter (f32 output),
our config reader and `load_lm`, and `Lm.forward` must give the NumPy logits (tests/helpers/numpy_lm.py)
within 1e-5.
"""

from __future__ import annotations

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
}
STEPS = 8  # > context: the attention window matters too


def pytorch_checkpoint(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float64 tensors named and shaped as Kyutai's LMModel.state_dict() for `cfg`."""
    d, D, dep_q, n_q = cfg["dim"], cfg["depformer_dim"], cfg["dep_q"], cfg["n_q"]
    gated = cfg["gating"] != "none"
    dep_gated = cfg.get("depformer_gating", cfg["gating"]) != "none"

    def kyutai_hidden(n: int, ff: int, on: bool) -> int:  # modules/gating.py's rule
        return (21 * n // 8 if ff == 4 * n else 2 * ff // 3) if on else ff

    hidden = kyutai_hidden(d, int(cfg["hidden_scale"] * d), gated)
    dep_hidden = kyutai_hidden(D, cfg["depformer_dim_feedforward"], dep_gated)
    schedule = cfg.get("depformer_weights_per_step_schedule")
    sets = (max(schedule) + 1 if schedule else dep_q) if cfg["depformer_weights_per_step"] else 1
    n_in = (max(schedule) + 1 if schedule else dep_q) if cfg["depformer_multi_linear"] else 1
    rank = cfg.get("depformer_low_rank_embeddings")
    w: dict[str, tuple] = {}

    def norm(name: str, n: int) -> None:
        if cfg["norm"].startswith("layer_norm"):
            w[f"{name}.weight"], w[f"{name}.bias"] = (n,), (n,)
        else:
            w[f"{name}.alpha"] = (1, 1, n)

    def ffn(prefix: str, gating_prefix: str, n: int, h: int) -> None:
        if gated:
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
        w[f"{p}.self_attn.in_projs.0.weight"], w[f"{p}.self_attn.out_projs.0.weight"] = (3 * d, d), (d, d)
        norm(f"{p}.norm1", d), norm(f"{p}.norm2", d)
        ffn(p, f"{p}.gating", d, hidden)
    for i in range(n_in):
        w[f"depformer_in.{i}.weight"] = (D, d)
    emb("depformer_text_emb", cfg["text_card"] + 1)
    for k in range(dep_q):
        w[f"linears.{k}.weight"] = (cfg["card"], D)
        if k:
            emb(f"depformer_emb.{k - 1}", cfg["card"] + 1)
    for l in range(cfg["depformer_num_layers"]):
        p = f"depformer.layers.{l}"
        for j in range(sets):
            w[f"{p}.self_attn.in_projs.{j}.weight"], w[f"{p}.self_attn.out_projs.{j}.weight"] = (3 * D, D), (D, D)
            if gated and cfg["depformer_weights_per_step"]:
                ffn(p, f"{p}.gating.{j}", D, dep_hidden)
        if not (gated and cfg["depformer_weights_per_step"]):
            ffn(p, f"{p}.gating", D, dep_hidden)
        norm(f"{p}.norm1", D), norm(f"{p}.norm2", D)
    out = {}
    for name, shape in sorted(w.items()):
        if name.endswith(".alpha") or (name.endswith(".weight") and "norm" in name):
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
    cfg = {**BASE, **VARIANTS[request.param]}
    rng = np.random.default_rng(sorted(VARIANTS).index(request.param))
    weights = pytorch_checkpoint(cfg, rng)
    root = tmp_path_factory.mktemp(request.param)
    mx.save_safetensors(str(root / "pt.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    (root / "config.json").write_text(json.dumps(cfg))
    out = convert(root / "pt.safetensors", root / "mlx", config=root / "config.json", dtype="f32",
                  log=lambda m: None)
    config = LmConfig.from_dict(json.loads((root / "mlx" / "config.json").read_text()))
    return request.param, cfg, weights, load_lm(out, config), rng


def test_forward_matches_numpy_float64(variant):
    name, cfg, weights, model, rng = variant
    assert model.dtype == mx.float32
    seq = delayed_sequence(cfg, rng)
    f32 = {k: v.astype(np.float32).astype(np.float64) for k, v in weights.items()}  # what the file holds
    want_text, want_audio = numpy_lm.forward(f32, cfg, seq)
    text, audio = model.forward(mx.array(seq)[None])
    np.testing.assert_allclose(np.array(text[0]), want_text, rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.array(audio[0]), want_audio, rtol=0, atol=1e-5, err_msg=name)
    assert np.abs(want_text).max() > 0.5  # not a degenerate comparison


def test_streaming_runs_every_variant(variant):
    """Stepping gives the teacher-forced numbers for every option (positions, norms, FFNs, embeddings)."""
    _, cfg, _, model, rng = variant
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
    c = model.config
    assert c.transformer.norm == ("layer_norm" if cfg["norm"].startswith("layer_norm") else "rms_norm")
    assert c.transformer.norm_eps == (1e-8 if cfg["norm"].endswith("_f32") else 1e-5)
    assert c.transformer.positional_embedding == cfg["positional_embedding"]
    assert c.depformer.positional_embedding == cfg["depformer_pos_emb"]
    assert c.transformer.gating == (cfg["gating"] == "silu")
    assert c.depformer_low_rank_embeddings == cfg.get("depformer_low_rank_embeddings")
    schedule = cfg.get("depformer_weights_per_step_schedule")
    assert c.depformer_weights_per_step_schedule == (tuple(schedule) if schedule else None)
    assert LmConfig.from_dict(c.to_kyutai_dict()) == c


def test_shared_weight_sets_need_the_schedule(tmp_path):
    cfg = {**BASE, **VARIANTS["low_rank_schedule_dep_rope"]}
    weights = pytorch_checkpoint(cfg, np.random.default_rng(0))
    mx.save_safetensors(str(tmp_path / "pt.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    no_schedule = {k: v for k, v in cfg.items() if k != "depformer_weights_per_step_schedule"}
    with pytest.raises(ConvertError, match="depformer_weights_per_step_schedule"):
        convert(tmp_path / "pt.safetensors", tmp_path / "o", config=no_schedule, log=lambda m: None)
