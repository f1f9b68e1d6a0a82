"""An independent float64 NumPy forward of Kyutai's LMModel, written from its published PyTorch source.

It reads a checkpoint in Kyutai's PyTorch layout (names as in `LMModel.state_dict()`) and a Kyutai
`config.json` dict, and scores a whole sequence the way `LMModel.forward` does during training: the
start tokens prepended, every stream read one position late, the depformer fed the given tokens. Nothing
here imports our model code, so it checks the converter, the config reader and `Lm` together.
"""

from __future__ import annotations

import math

import numpy as np

Weights = dict[str, np.ndarray]


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))  # exact GELU, PyTorch's F.gelu default


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def norm(w: Weights, name: str, kind: str, x: np.ndarray) -> np.ndarray:
    if kind.startswith("layer_norm"):
        eps = 1e-8 if kind == "layer_norm_f32" else 1e-5
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]
    eps = 1e-8 if kind == "rms_norm_f32" else 1e-5
    return x * w[f"{name}.alpha"].reshape(-1) / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


def sin_positions(t: int, dim: int, max_period: float) -> np.ndarray:
    half = dim // 2
    phase = np.arange(t, dtype=np.float64)[:, None] / max_period ** (np.arange(half) / (half - 1))
    return np.concatenate([np.cos(phase), np.sin(phase)], axis=-1)


def rope(x: np.ndarray, max_period: float) -> np.ndarray:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of [H, T, D] by position * max_period^(-2i/D)."""
    _, t, d = x.shape
    freqs = np.exp(np.arange(d // 2) * (-math.log(max_period) * 2 / d))
    angle = np.arange(t)[:, None] * freqs[None, :]
    re, im = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = re * np.cos(angle) - im * np.sin(angle)
    out[..., 1::2] = re * np.sin(angle) + im * np.cos(angle)
    return out


def attention(
    x: np.ndarray, in_proj: np.ndarray, out_proj: np.ndarray, heads: int, context: int | None,
    rope_period: float | None,
) -> np.ndarray:
    t, d = x.shape
    qkv = (x @ in_proj.T).reshape(t, 3, heads, d // heads).transpose(1, 2, 0, 3)  # [3, H, T, hd]
    q, k, v = qkv
    if rope_period is not None:
        q, k = rope(q, rope_period), rope(k, rope_period)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(d // heads)
    delta = np.arange(t)[:, None] - np.arange(t)[None, :]
    allowed = delta >= 0
    if context is not None:
        allowed &= delta < context
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2).reshape(t, d) @ out_proj.T


def ffn(w: Weights, prefix: str, x: np.ndarray, gated: bool) -> np.ndarray:
    if not gated:
        return gelu(x @ w[f"{prefix}.linear1.weight"].T) @ w[f"{prefix}.linear2.weight"].T
    h = x @ w[f"{prefix}.linear_in.weight"].T
    gate, up = np.split(h, 2, axis=-1)
    return (silu(gate) * up) @ w[f"{prefix}.linear_out.weight"].T


def _in_proj(w: Weights, prefix: str, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    if f"{prefix}.in_projs.{index}.weight" in w:
        return w[f"{prefix}.in_projs.{index}.weight"], w[f"{prefix}.out_projs.{index}.weight"]
    return np.split(w[f"{prefix}.in_proj_weight"], count)[index], np.split(w[f"{prefix}.out_proj.weight"], count)[index]


def temporal(w: Weights, cfg: dict, x: np.ndarray) -> np.ndarray:
    pos = cfg.get("positional_embedding", "rope")
    if pos == "sin":
        x = x + sin_positions(x.shape[0], x.shape[1], cfg["max_period"])
    gated = cfg.get("gating", "silu") != "none"
    for l in range(cfg["num_layers"]):
        p = f"transformer.layers.{l}"
        inp, outp = _in_proj(w, f"{p}.self_attn", 0, 1)
        x = x + attention(
            norm(w, f"{p}.norm1", cfg["norm"], x), inp, outp, cfg["num_heads"], cfg.get("context"),
            cfg["max_period"] if pos == "rope" else None,
        )
        x = x + ffn(w, f"{p}.gating" if gated else p, norm(w, f"{p}.norm2", cfg["norm"], x), gated)
    return norm(w, "out_norm", cfg["norm"], x)


def embed(w: Weights, name: str, tokens: np.ndarray) -> np.ndarray:
    out = w[f"{name}.weight"][tokens]
    if f"{name}.low_rank.weight" in w:
        out = out @ w[f"{name}.low_rank.weight"].T
    return out


def depformer(w: Weights, cfg: dict, hidden: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """hidden [T, dim]; seq [1 + n_q, T] (the positions' own tokens). Returns [dep_q, T, card]."""
    dep_q, dim = cfg["dep_q"], cfg["depformer_dim"]
    schedule = cfg.get("depformer_weights_per_step_schedule")
    per_step = cfg.get("depformer_weights_per_step", False)
    sets = (max(schedule) + 1 if schedule else dep_q) if per_step else 1
    pos = cfg.get("depformer_pos_emb", "sin")
    gated = cfg.get("gating", "silu") != "none"
    logits = []
    for t in range(hidden.shape[0]):
        xs = []
        for k in range(dep_q):
            i = (schedule[k] if schedule else k) if cfg.get("depformer_multi_linear", False) else 0
            token = embed(w, "depformer_text_emb", seq[0, t]) if k == 0 else embed(w, f"depformer_emb.{k - 1}", seq[k, t])
            xs.append(hidden[t] @ w[f"depformer_in.{i}.weight"].T + token)
        x = np.stack(xs)  # [dep_q, D]: the frame's steps form the depformer's sequence
        if pos == "sin":
            x = x + sin_positions(dep_q, dim, cfg.get("depformer_max_period", 10_000))
        for l in range(cfg["depformer_num_layers"]):
            p = f"depformer.layers.{l}"
            n1 = norm(w, f"{p}.norm1", cfg["norm"], x)
            # Each step attends with its own weight set: project every step with every set, keep its own.
            steps = [schedule[k] if schedule else k for k in range(dep_q)] if per_step else [0] * dep_q
            qkv_rows = []
            for k in range(dep_q):
                inp, _ = _in_proj(w, f"{p}.self_attn", steps[k], sets)
                qkv_rows.append(n1[k] @ inp.T)
            qkv = np.stack(qkv_rows).reshape(dep_q, 3, cfg["depformer_num_heads"], -1).transpose(1, 2, 0, 3)
            q, kk, v = qkv
            if pos == "rope":
                q, kk = rope(q, cfg.get("depformer_max_period", 10_000)), rope(kk, cfg.get("depformer_max_period", 10_000))
            scores = q @ kk.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
            scores = np.where(np.tril(np.ones((dep_q, dep_q), bool)), scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            att = (probs @ v).transpose(1, 0, 2).reshape(dep_q, -1)
            x = x + np.stack([att[k] @ _in_proj(w, f"{p}.self_attn", steps[k], sets)[1].T for k in range(dep_q)])
            n2 = norm(w, f"{p}.norm2", cfg["norm"], x)
            if gated and per_step:
                x = x + np.stack([ffn(w, f"{p}.gating.{steps[k]}", n2[k : k + 1], True)[0] for k in range(dep_q)])
            else:
                x = x + ffn(w, f"{p}.gating" if gated else p, n2, gated)
        logits.append(np.stack([x[k] @ w[f"linears.{k}.weight"].T for k in range(dep_q)]))
    return np.stack(logits, axis=1)


def forward(w: Weights, cfg: dict, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """seq: [1 + n_q, T] delayed sequence (start tokens where a stream has no frame). Returns text logits
    [T, text_card] and audio logits [dep_q, T, card] for every position."""
    initial = np.array([cfg["text_card"]] + [cfg["card"]] * cfg["n_q"])
    inputs = np.concatenate([initial[:, None], seq[:, :-1]], axis=1)
    x = w["text_emb.weight"][inputs[0]]
    for i in range(cfg["n_q"]):
        x = x + w[f"emb.{i}.weight"][inputs[1 + i]]
    hidden = temporal(w, cfg, x)
    return hidden @ w["text_linear.weight"].T, depformer(w, cfg, hidden, seq)
