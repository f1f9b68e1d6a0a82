"""Kyutai's model family as test data: configs with each option, and random checkpoints in their PyTorch layout.

`pytorch_checkpoint(cfg, rng)` names and shapes every tensor as Kyutai's `LMModel(**cfg).state_dict()` would
(read off moshi/models/lm.py and modules/), with no code of ours involved; tests/helpers/numpy_lm.py scores it.
"""

from __future__ import annotations

import functools

import numpy as np

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
    # Kyutai's speech-to-text layout scaled down (configs/stt_*.json): text only (dep_q 0, no depformer), 32
    # codebooks of the user, no delay, VAD extra heads, stt_config; without depformer_multi_linear LMModel still
    # builds one unused depformer_in, which the converter drops.
    "stt_text_only": dict(
        n_q=32, dep_q=0, delays=[0] * 33, extra_heads_num_heads=4, extra_heads_dim=6, depformer_multi_linear=False,
        model_type="stt", lm_gen_config={"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
        stt_config={"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
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
    for i in range(n_in):  # LMModel builds these even for dep_q 0 (one, without depformer_multi_linear)
        w[f"depformer_in.{i}.weight"] = (D, d)
    if dep_q:  # a text-only model (dep_q 0) has no depformer: no embeddings, layers or heads
        emb("depformer_text_emb", cfg["text_card"] + 1)
    for k in range(dep_q):
        w[f"linears.{k}.weight"] = (cfg["card"], D)
        if k:
            emb(f"depformer_emb.{k - 1}", cfg["card"] + 1)
        if cfg.get("depformer_norm"):
            norm(f"depformer_norms.{k}", D, cfg["depformer_norm"])
    for l in range(get("depformer_num_layers") if dep_q else 0):
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
