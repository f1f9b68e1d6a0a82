"""An independent float64 NumPy forward of Kyutai's LMModel, written from its published PyTorch source.

It reads a checkpoint in Kyutai's PyTorch layout (names as in `LMModel.state_dict()`) and a Kyutai
`config.json` dict, and scores a whole sequence the way `LMModel.forward` does during training: the
start tokens prepended, every stream read one position late, the depformer fed the given tokens. A key the
config leaves out takes LMModel's default (the table below, read off moshi/models/lm.py and
modules/transformer.py); the depformer inherits the unprefixed keys unless a `depformer_` key says otherwise.
Nothing here imports our model code, so it checks the converter, the config reader and `Lm` together.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

Weights = dict[str, np.ndarray]

#: LMModel / StreamingTransformer defaults for the keys this reference reads.
DEFAULTS = {
    "norm": "layer_norm", "positional_embedding": "sin", "gating": "none", "max_period": 10_000,
    "kv_repeat": 1, "layer_scale": None, "positional_scale": 1.0, "depformer_pos_emb": "sin",
    "depformer_multi_linear": False, "depformer_weights_per_step": False, "context": None,
}
INHERITED = ("gating", "max_period", "kv_repeat", "layer_scale", "positional_scale", "num_layers")


def get(cfg: dict, key: str):
    """A config value as LMModel sees it: given, inherited by the depformer, or LMModel's default."""
    if key in cfg:
        return cfg[key]
    if key.startswith("depformer_") and key.removeprefix("depformer_") in INHERITED:
        return get(cfg, key.removeprefix("depformer_"))
    return DEFAULTS[key]


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


def rope(x: np.ndarray, max_period: float, interleave: bool = True) -> np.ndarray:
    """Rotate [H, T, D] by position * max_period^(-2i/D): pairs (x[2i], x[2i+1]), or (x[i], x[i + D/2])."""
    _, t, d = x.shape
    freqs = np.exp(np.arange(d // 2) * (-math.log(max_period) * 2 / d))
    angle = np.arange(t)[:, None] * freqs[None, :]
    if interleave:
        re, im = x[..., 0::2], x[..., 1::2]
    else:
        re, im = x[..., : d // 2], x[..., d // 2 :]
    out_re = re * np.cos(angle) - im * np.sin(angle)
    out_im = re * np.sin(angle) + im * np.cos(angle)
    out = np.empty_like(x)
    if interleave:
        out[..., 0::2], out[..., 1::2] = out_re, out_im
    else:
        out[..., : d // 2], out[..., d // 2 :] = out_re, out_im
    return out


def rotate(q: np.ndarray, k: np.ndarray, pos_emb: str, max_period: float) -> tuple[np.ndarray, np.ndarray]:
    if pos_emb in ("rope", "sin_rope", "rope_concat"):
        interleave = pos_emb != "rope_concat"
        return rope(q, max_period, interleave), rope(k, max_period, interleave)
    return q, k


def split_qkv(qkv: np.ndarray, d: int, heads: int, kv_repeat: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[T, d + 2 kv] -> q [H, T, hd], k and v [H, T, hd] with each key/value head repeated kv_repeat times
    (PyTorch's expand_repeated_kv: query head i reads key/value head i // kv_repeat)."""
    t, _ = qkv.shape
    kv_heads = heads // kv_repeat
    hd = d // heads
    q = qkv[:, :d].reshape(t, heads, hd).transpose(1, 0, 2)
    k = qkv[:, d : d + kv_heads * hd].reshape(t, kv_heads, hd).transpose(1, 0, 2)
    v = qkv[:, d + kv_heads * hd :].reshape(t, kv_heads, hd).transpose(1, 0, 2)
    return q, np.repeat(k, kv_repeat, axis=0), np.repeat(v, kv_repeat, axis=0)


def softmax_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, context: int | None) -> np.ndarray:
    h, t, hd = q.shape
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    delta = np.arange(t)[:, None] - np.arange(t)[None, :]
    allowed = delta >= 0
    if context is not None:
        allowed &= delta < context
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2).reshape(t, h * hd)


def ffn(w: Weights, prefix: str, x: np.ndarray, gated: bool) -> np.ndarray:
    if not gated:
        return gelu(x @ w[f"{prefix}.linear1.weight"].T) @ w[f"{prefix}.linear2.weight"].T
    h = x @ w[f"{prefix}.linear_in.weight"].T
    gate, up = np.split(h, 2, axis=-1)
    return (silu(gate) * up) @ w[f"{prefix}.linear_out.weight"].T


def _proj(w: Weights, prefix: str, kind: str, index: int, count: int) -> np.ndarray:
    if f"{prefix}.{kind}_projs.{index}.weight" in w:
        return w[f"{prefix}.{kind}_projs.{index}.weight"]
    stacked = w[f"{prefix}.in_proj_weight" if kind == "in" else f"{prefix}.out_proj.weight"]
    return np.split(stacked, count)[index]


def _scaled(w: Weights, name: str, update: np.ndarray) -> np.ndarray:
    return update * w[name] if name in w else update


def temporal(w: Weights, cfg: dict, x: np.ndarray) -> np.ndarray:
    pos = get(cfg, "positional_embedding")
    if pos in ("sin", "sin_rope"):
        x = x + get(cfg, "positional_scale") * sin_positions(x.shape[0], x.shape[1], get(cfg, "max_period"))
    gated = get(cfg, "gating") != "none"
    kind = get(cfg, "norm")
    for l in range(cfg["num_layers"]):
        p = f"transformer.layers.{l}"
        q, k, v = split_qkv(norm(w, f"{p}.norm1", kind, x) @ _proj(w, f"{p}.self_attn", "in", 0, 1).T,
                            x.shape[1], cfg["num_heads"], get(cfg, "kv_repeat"))
        q, k = rotate(q, k, pos, get(cfg, "max_period"))
        update = softmax_attend(q, k, v, get(cfg, "context")) @ _proj(w, f"{p}.self_attn", "out", 0, 1).T
        x = x + _scaled(w, f"{p}.layer_scale_1.scale", update)
        update = ffn(w, f"{p}.gating" if gated else p, norm(w, f"{p}.norm2", kind, x), gated)
        x = x + _scaled(w, f"{p}.layer_scale_2.scale", update)
    return norm(w, "out_norm", kind, x)


def embed(w: Weights, name: str, tokens: np.ndarray) -> np.ndarray:
    out = w[f"{name}.weight"][tokens]
    if f"{name}.low_rank.weight" in w:
        out = out @ w[f"{name}.low_rank.weight"].T
    return out


def depformer(w: Weights, cfg: dict, hidden: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """hidden [T, dim]; seq [1 + n_q, T] (the positions' own tokens). Returns [dep_q, T, card]
    (no rows for a text-only model: dep_q 0, which LMModel builds without a depformer)."""
    dep_q = cfg["dep_q"]
    if dep_q == 0:
        return np.zeros((0, hidden.shape[0], cfg["card"]))
    dim = cfg["depformer_dim"]
    schedule = cfg.get("depformer_weights_per_step_schedule")
    per_step = get(cfg, "depformer_weights_per_step")
    sets = (max(schedule) + 1 if schedule else dep_q) if per_step else 1
    steps = [schedule[k] if schedule else k for k in range(dep_q)] if per_step else [0] * dep_q
    pos = get(cfg, "depformer_pos_emb")
    period = get(cfg, "depformer_max_period")
    gated = get(cfg, "depformer_gating") != "none"
    kind = get(cfg, "norm")
    heads, kv_repeat = cfg["depformer_num_heads"], get(cfg, "depformer_kv_repeat")
    out_norm = cfg.get("depformer_norm")
    logits = []
    for t in range(hidden.shape[0]):
        xs = []
        for k in range(dep_q):
            i = (schedule[k] if schedule else k) if get(cfg, "depformer_multi_linear") else 0
            token = embed(w, "depformer_text_emb", seq[0, t]) if k == 0 else embed(w, f"depformer_emb.{k - 1}", seq[k, t])
            xs.append(hidden[t] @ w[f"depformer_in.{i}.weight"].T + token)
        x = np.stack(xs)  # [dep_q, D]: the frame's steps form the depformer's sequence
        if pos in ("sin", "sin_rope"):
            x = x + get(cfg, "depformer_positional_scale") * sin_positions(dep_q, dim, period)
        for l in range(get(cfg, "depformer_num_layers")):
            p = f"depformer.layers.{l}"
            n1 = norm(w, f"{p}.norm1", kind, x)
            # Each step attends with its own weight set: project each step with its set.
            qkv = np.stack([n1[k] @ _proj(w, f"{p}.self_attn", "in", steps[k], sets).T for k in range(dep_q)])
            q, kk, v = split_qkv(qkv, dim, heads, kv_repeat)
            q, kk = rotate(q, kk, pos, period)
            att = softmax_attend(q, kk, v, None)  # the depformer's context is forced to None
            update = np.stack([att[k] @ _proj(w, f"{p}.self_attn", "out", steps[k], sets).T for k in range(dep_q)])
            x = x + _scaled(w, f"{p}.layer_scale_1.scale", update)
            n2 = norm(w, f"{p}.norm2", kind, x)
            if gated and per_step:
                update = np.stack([ffn(w, f"{p}.gating.{steps[k]}", n2[k : k + 1], True)[0] for k in range(dep_q)])
            else:
                update = ffn(w, f"{p}.gating" if gated else p, n2, gated)
            x = x + _scaled(w, f"{p}.layer_scale_2.scale", update)
        outs = [norm(w, f"depformer_norms.{k}", out_norm, x[k : k + 1])[0] if out_norm else x[k] for k in range(dep_q)]
        logits.append(np.stack([outs[k] @ w[f"linears.{k}.weight"].T for k in range(dep_q)]))
    return np.stack(logits, axis=1)


def condition(w: Weights, cfg: dict, values: dict[str, str]) -> np.ndarray:
    """The fuser's sum of the look-up-table conditioners for `values`: [dim]."""
    total = np.zeros(cfg["dim"])
    for name in cfg["fuser"]["sum"]:
        lut = cfg["conditioners"][name]["lut"]
        possible = lut.get("possible_values")
        if possible is None:
            row = int(hashlib.sha256(values[name].encode()).hexdigest(), 16) % lut["n_bins"]
        else:
            row = possible.index(values[name])
        p = f"condition_provider.conditioners.{name}"
        total = total + w[f"{p}.embed.weight"][row] @ w[f"{p}.output_proj.weight"].T
    return total


def temporal_hidden(w: Weights, cfg: dict, seq: np.ndarray, values: dict[str, str] | None = None) -> np.ndarray:
    """The normalised temporal output [T, dim] for a delayed sequence [1 + n_q, T]."""
    initial = np.array([cfg["text_card"]] + [cfg["card"]] * cfg["n_q"])
    inputs = np.concatenate([initial[:, None], seq[:, :-1]], axis=1)
    x = w["text_emb.weight"][inputs[0]]
    for i in range(cfg["n_q"]):
        x = x + w[f"emb.{i}.weight"][inputs[1 + i]]
    if values is not None:
        x = x + condition(w, cfg, values)[None, :]
    return temporal(w, cfg, x)


def forward(
    w: Weights, cfg: dict, seq: np.ndarray, values: dict[str, str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """seq: [1 + n_q, T] delayed sequence (start tokens where a stream has no frame). Returns text logits
    [T, text_card] and audio logits [dep_q, T, card] for every position."""
    hidden = temporal_hidden(w, cfg, seq, values)
    return hidden @ w["text_linear.weight"].T, depformer(w, cfg, hidden, seq)


def extra_heads(w: Weights, cfg: dict, hidden: np.ndarray) -> list[np.ndarray]:
    """Softmax of each extra head over the temporal output, as LMGen.step_with_extra_heads."""
    out = []
    for i in range(cfg.get("extra_heads_num_heads", 0)):
        z = hidden @ w[f"extra_heads.{i}.weight"].T
        z = np.exp(z - z.max(-1, keepdims=True))
        out.append(z / z.sum(-1, keepdims=True))
    return out
