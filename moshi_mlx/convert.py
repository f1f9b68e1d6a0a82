"""Convert a PyTorch Moshi checkpoint into the MLX layout, optionally quantized.

    python -m moshi_mlx.convert IN.safetensors OUT_DIR [-q 4|8] [--config config.json]

IN is laid out like `model.safetensors` of kyutai/moshiko-pytorch-bf16 (attention weights either as
`in_projs.{i}` / `out_projs.{i}` or as the older stacked `in_proj_weight` / `out_proj.weight`). An MLX bf16
checkpoint is accepted too, which only re-quantizes it. OUT_DIR receives `model.safetensors`,
`model.q8.safetensors` or `model.q4.safetensors` (same names, shapes and dtypes as the published MLX files)
and a `config.json` with the Kyutai LM config keys.

The conversion streams: one source tensor is read, turned into its MLX tensors, quantized if
asked, written, and dropped before the next one, so memory stays at the size of the largest tensor.

Name mapping (PyTorch -> MLX), k = depformer step / slice, l = layer:
    emb.{i}.weight                                  -> audio_embs.{i}.weight
    text_emb.weight, text_linear.weight             -> same names
    out_norm.alpha [1,1,d]                          -> out_norm.weight [d]
    transformer.layers.{l}.norm{1,2}.alpha          -> transformer.layers.{l}.norm{1,2}.weight
    transformer.layers.{l}.self_attn.in_projs.0.weight  (or .in_proj_weight)
                                                    -> transformer.layers.{l}.self_attn.in_proj.weight
    transformer.layers.{l}.self_attn.out_projs.0.weight (or .out_proj.weight)
                                                    -> transformer.layers.{l}.self_attn.out_proj.weight
    transformer.layers.{l}.gating.linear_{in,out}.weight -> same names
    depformer_in.{k}.weight                         -> depformer.slices.{k}.linear_in.weight
    linears.{k}.weight                              -> depformer.slices.{k}.linear_out.weight
    depformer_text_emb.weight                       -> depformer.slices.0.emb.weight
    depformer_emb.{k-1}.weight                      -> depformer.slices.{k}.emb.weight   (k >= 1)
    depformer.layers.{l}.self_attn.in_projs.{k}.weight  (or rows k of the stacked .in_proj_weight)
                                -> depformer.slices.{k}.transformer.layers.{l}.self_attn.in_proj.weight
    depformer.layers.{l}.self_attn.out_projs.{k}.weight (or rows k of the stacked .out_proj.weight)
                                -> depformer.slices.{k}.transformer.layers.{l}.self_attn.out_proj.weight
    depformer.layers.{l}.gating.{k}.linear_{in,out}.weight
                                -> depformer.slices.{k}.transformer.layers.{l}.gating.linear_{in,out}.weight
    depformer.layers.{l}.norm{1,2}.alpha (shared by all steps)
                                -> depformer.slices.{k}.transformer.layers.{l}.norm{1,2}.weight, every k
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cli
from .errors import MoshiError
from .model_files.checkpoint import GROUP_SIZE_FOR_BITS as QUANT_GROUP_SIZE
from .model_files.checkpoint import Quantization, WeightsError, read_tensor_infos
from .model_files.hub import MOSHI_NAMES
from .models.config import ffn_hidden_dim, ffn_nominal_size
from .outputs import OutputError, atomic_output, check_outputs

__all__ = [
    "ConvertError",
    "Dims",
    "Piece",
    "Plan",
    "QUANT_GROUP_SIZE",
    "plan_conversion",
    "output_specs",
    "build_config",
    "convert",
    "main",
]

_SOURCE_DTYPES = ("BF16", "F16", "F32")
FLOAT_DTYPES = {"bf16": "BF16", "f32": "F32"}  # --dtype -> safetensors dtype of unquantized tensors


class ConvertError(MoshiError, ValueError):
    """The input cannot be converted; the message is one line meant for the user."""


@dataclass(frozen=True)
class Dims:
    """Sizes read off the checkpoint's tensor shapes."""

    dim: int
    num_layers: int
    hidden: int  # gated FFN hidden size of the temporal transformer
    text_in: int
    text_out: int
    audio_vocab: int  # input vocabulary of each audio codebook (card + 1)
    n_q: int
    dep_q: int
    dep_dim: int
    dep_layers: int
    dep_hidden: int
    norm: str = "rms_norm"  # "rms_norm" (alpha) or "layer_norm" (weight + bias), read off the names
    gating: bool = True  # gating.linear_in/out, else linear1/linear2
    low_rank: int | None = None  # depformer embedding rank, when low-rank
    dep_in: int = 0  # depformer_in projections stored (dep_q, or fewer when steps share them)
    dep_sets: int = 0  # depformer weight sets stored per layer (dep_q, 1, or a shared schedule's count)


@dataclass(frozen=True)
class Piece:
    """One MLX tensor (before quantization) and where its values come from."""

    name: str
    shape: tuple[int, ...]
    source: str
    chunk: tuple[int, int] | None = None  # (index, count): this piece is one of `count` equal row blocks


@dataclass
class Plan:
    layout: str  # "pytorch" or "mlx"
    dims: Dims
    pieces: list[Piece]


# ---------------------------------------------------------------------------------------------------------
# planning: works on {name: shape} alone, so it can be checked against the 7B manifests without any data


def _count(names: Any, pattern: str) -> int:
    """How many consecutive indices 0, 1, ... `pattern` (group 1 = the index) finds at the start of names."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for n in names if (m := rx.match(n))}
    n = 0
    while n in found:
        n += 1
    return n


def _need(shapes: dict[str, tuple[int, ...]], name: str, ndim: int) -> tuple[int, ...]:
    if name not in shapes:
        raise ConvertError(f"missing tensor {name}: not a complete Moshi checkpoint")
    shape = shapes[name]
    if len(shape) != ndim:
        raise ConvertError(f"tensor {name} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def detect_layout(names: Any) -> str:
    names = set(names)
    if any(n.endswith(".scales") for n in names):
        raise ConvertError("input is an already quantized MLX checkpoint; convert from the PyTorch or MLX bf16 file")
    if "audio_embs.0.weight" in names and "text_emb.weight" in names:
        return "mlx"
    if "emb.0.weight" in names and "text_emb.weight" in names:
        return "pytorch"
    if any(n.startswith("encoder.") for n in names) and any(n.startswith("quantizer.") for n in names):
        raise ConvertError("input is Mimi codec weights, not the Moshi LM (it needs no conversion)")
    raise ConvertError("input is not a PyTorch Moshi LM checkpoint (no text_emb.weight / emb.0.weight tensors)")


def _dims(shapes: dict[str, tuple[int, ...]], layout: str) -> Dims:
    if layout == "pytorch":
        audio_emb, layer0 = "emb.{}.weight", "transformer.layers.0."
        dep_in0 = "depformer_in.0.weight"
        n_q = _count(shapes, r"emb\.(\d+)\.weight$")
        dep_q = _count(shapes, r"linears\.(\d+)\.weight$")
        dep_in = _count(shapes, r"depformer_in\.(\d+)\.weight$")
        dep_layers = _count(shapes, r"depformer\.layers\.(\d+)\.")
        dep_sets = max(
            _count(shapes, r"depformer\.layers\.0\.self_attn\.in_projs\.(\d+)\.weight$"),
            _count(shapes, r"depformer\.layers\.0\.gating\.(\d+)\.linear_in\.weight$"),
        )
        if not dep_sets and "depformer.layers.0.self_attn.in_proj_weight" in shapes:
            rows = shapes["depformer.layers.0.self_attn.in_proj_weight"][0]
            dep_sets = rows // (3 * shapes[dep_in0][0]) if dep_in0 in shapes else 0
        dep_out = [
            "depformer.layers.0.gating.0.linear_out.weight",
            "depformer.layers.0.gating.linear_out.weight",
            "depformer.layers.0.linear2.weight",
        ]
        text_emb_dep = "depformer_text_emb.weight"
    else:
        audio_emb, layer0 = "audio_embs.{}.weight", "transformer.layers.0."
        dep_in0 = "depformer.slices.0.linear_in.weight"
        n_q = _count(shapes, r"audio_embs\.(\d+)\.weight$")
        dep_q = dep_in = dep_sets = _count(shapes, r"depformer\.slices\.(\d+)\.")
        dep_layers = _count(shapes, r"depformer\.slices\.0\.transformer\.layers\.(\d+)\.")
        dep_out = [
            "depformer.slices.0.transformer.layers.0.gating.linear_out.weight",
            "depformer.slices.0.transformer.layers.0.gating.linear2.weight",
        ]
        text_emb_dep = "depformer.slices.0.emb.weight"
    text_in, dim = _need(shapes, "text_emb.weight", 2)
    text_out = _need(shapes, "text_linear.weight", 2)[0]
    audio_vocab = _need(shapes, audio_emb.format(0), 2)[0]
    num_layers = _count(shapes, r"transformer\.layers\.(\d+)\.")
    if num_layers == 0:
        raise ConvertError("missing tensors transformer.layers.0.*: not a complete Moshi checkpoint")
    gating = not any(n.startswith(layer0 + "linear1.") or n.startswith(layer0 + "gating.linear1.") for n in shapes)
    if gating:
        hidden = _need(shapes, layer0 + "gating.linear_out.weight", 2)[1]
    else:
        hidden = _need(shapes, layer0 + ("linear2.weight" if layout == "pytorch" else "gating.linear2.weight"), 2)[1]
    norm = "layer_norm" if layer0 + "norm1.bias" in shapes else "rms_norm"
    if dep_q == 0 or dep_layers == 0:
        raise ConvertError("no depformer tensors: only Moshi checkpoints with a depformer can be converted")
    dep_dim = _need(shapes, dep_in0, 2)[0]
    name = next((n for n in dep_out if n in shapes), dep_out[0])
    dep_hidden = _need(shapes, name, 2)[1]
    rank = _need(shapes, text_emb_dep, 2)[1]
    low_rank = rank if rank != dep_dim else None
    return Dims(
        dim, num_layers, hidden, text_in, text_out, audio_vocab, n_q, dep_q, dep_dim, dep_layers, dep_hidden,
        norm, gating, low_rank, dep_in, max(dep_sets, 1),
    )


def _step_sources(count: int, dep_q: int, schedule: list[int] | None, what: str) -> list[int]:
    """Which stored weight set each depformer step uses: its own, the single shared one, or the schedule's."""
    if schedule is not None and count == max(schedule) + 1:
        return list(schedule)
    if count == dep_q:
        return list(range(dep_q))
    if count == 1:
        return [0] * dep_q
    raise ConvertError(
        f"the checkpoint stores {count} depformer {what} for {dep_q} steps: "
        "pass --config with depformer_weights_per_step_schedule"
    )


def plan_conversion(
    shapes: dict[str, tuple[int, ...]] | dict[str, list[int]], schedule: list[int] | None = None
) -> Plan:
    """Map a checkpoint's {name: shape} to the MLX tensors it becomes; raises ConvertError on any mismatch.

    `schedule` (config.json's depformer_weights_per_step_schedule) says which stored depformer weight set each
    step uses when steps share them; the MLX layout gets a copy per step.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    layout = detect_layout(shapes)
    d = _dims(shapes, layout)
    if schedule is not None and len(schedule) != d.dep_q:
        raise ConvertError(f"depformer_weights_per_step_schedule has {len(schedule)} entries; the model has {d.dep_q} steps")
    in_src = _step_sources(d.dep_in, d.dep_q, schedule, "input projections")
    set_src = _step_sources(d.dep_sets, d.dep_q, schedule, "weight sets")
    pieces: list[Piece] = []
    missing: list[str] = []
    used: set[str] = set()

    def add(name: str, shape: tuple[int, ...], *candidates: tuple) -> None:
        """candidates: (source, source_shape) or (source, source_shape, (index, count)); first present wins."""
        if layout == "mlx":
            candidates = ((name, shape),)
        for cand in candidates:
            src, src_shape = cand[0], tuple(cand[1])
            chunk = cand[2] if len(cand) > 2 else None
            if src in shapes:
                if shapes[src] != src_shape:
                    raise ConvertError(f"tensor {src} has shape {list(shapes[src])}, expected {list(src_shape)}")
                pieces.append(Piece(name, shape, src, chunk))
                used.add(src)
                return
        missing.append(candidates[0][0])

    D, K = d.dep_dim, d.dep_q

    def add_norm(name: str, source: str, n: int) -> None:
        """RMSNorm alpha [1, 1, n] -> weight [n]; LayerNorm weight and bias keep their names."""
        if d.norm == "layer_norm":
            add(f"{name}.weight", (n,), (f"{source}.weight", (n,)))
            add(f"{name}.bias", (n,), (f"{source}.bias", (n,)))
        else:
            add(f"{name}.weight", (n,), (f"{source}.alpha", (1, 1, n)))

    def add_ffn(name: str, source: str, n: int, h: int) -> None:
        """Gated: gating.linear_in/out; plain: PyTorch linear1/linear2 -> gating.linear1/linear2."""
        if d.gating:
            add(f"{name}.gating.linear_in.weight", (2 * h, n), (f"{source}.linear_in.weight", (2 * h, n)))
            add(f"{name}.gating.linear_out.weight", (n, h), (f"{source}.linear_out.weight", (n, h)))
        else:
            add(f"{name}.gating.linear1.weight", (h, n), (f"{source.removesuffix('.gating')}.linear1.weight", (h, n)))
            add(f"{name}.gating.linear2.weight", (n, h), (f"{source.removesuffix('.gating')}.linear2.weight", (n, h)))

    def add_emb(name: str, source: str, vocab: int) -> None:
        if d.low_rank is None:
            add(f"{name}.weight", (vocab, D), (f"{source}.weight", (vocab, D)))
        else:
            add(f"{name}.weight", (vocab, d.low_rank), (f"{source}.weight", (vocab, d.low_rank)))
            add(f"{name}.low_rank.weight", (D, d.low_rank), (f"{source}.low_rank.weight", (D, d.low_rank)))

    add("text_emb.weight", (d.text_in, d.dim), ("text_emb.weight", (d.text_in, d.dim)))
    for i in range(d.n_q):
        add(f"audio_embs.{i}.weight", (d.audio_vocab, d.dim), (f"emb.{i}.weight", (d.audio_vocab, d.dim)))
    for l in range(d.num_layers):
        p = f"transformer.layers.{l}"
        add(
            f"{p}.self_attn.in_proj.weight", (3 * d.dim, d.dim),
            (f"{p}.self_attn.in_projs.0.weight", (3 * d.dim, d.dim)),
            (f"{p}.self_attn.in_proj_weight", (3 * d.dim, d.dim)),
        )
        add(
            f"{p}.self_attn.out_proj.weight", (d.dim, d.dim),
            (f"{p}.self_attn.out_projs.0.weight", (d.dim, d.dim)),
            (f"{p}.self_attn.out_proj.weight", (d.dim, d.dim)),
        )
        for n in ("norm1", "norm2"):
            add_norm(f"{p}.{n}", f"{p}.{n}", d.dim)
        add_ffn(p, f"{p}.gating", d.dim, d.hidden)
    add_norm("out_norm", "out_norm", d.dim)
    add("text_linear.weight", (d.text_out, d.dim), ("text_linear.weight", (d.text_out, d.dim)))
    S = d.dep_sets
    for k in range(K):
        s = f"depformer.slices.{k}"
        j = set_src[k]  # this step's weight set
        if k == 0:
            add_emb(f"{s}.emb", "depformer_text_emb", d.text_in)
        else:
            add_emb(f"{s}.emb", f"depformer_emb.{k - 1}", d.audio_vocab)
        add(f"{s}.linear_in.weight", (D, d.dim), (f"depformer_in.{in_src[k]}.weight", (D, d.dim)))
        add(f"{s}.linear_out.weight", (d.audio_vocab - 1, D), (f"linears.{k}.weight", (d.audio_vocab - 1, D)))
        for l in range(d.dep_layers):
            q, t = f"depformer.layers.{l}", f"{s}.transformer.layers.{l}"
            add(
                f"{t}.self_attn.in_proj.weight", (3 * D, D),
                (f"{q}.self_attn.in_projs.{j}.weight", (3 * D, D)),
                (f"{q}.self_attn.in_proj_weight", (S * 3 * D, D), (j, S)),
            )
            add(
                f"{t}.self_attn.out_proj.weight", (D, D),
                (f"{q}.self_attn.out_projs.{j}.weight", (D, D)),
                (f"{q}.self_attn.out_proj.weight", (S * D, D), (j, S)),
            )
            for n in ("norm1", "norm2"):
                add_norm(f"{t}.{n}", f"{q}.{n}", D)
            gated_per_step = f"{q}.gating.{j}.linear_in.weight" in shapes
            add_ffn(t, f"{q}.gating.{j}" if gated_per_step else f"{q}.gating", D, d.dep_hidden)

    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"missing tensor {missing[0]}{more}: not a complete Moshi checkpoint")
    unexpected = sorted(set(shapes) - used)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConvertError(
            f"unexpected tensor {unexpected[0]}{more}: not a Moshi checkpoint layout this converter knows"
        )
    return Plan(layout, d, pieces)


def _quantized_parts(
    name: str, shape: tuple[int, ...], bits: int | None, float_dtype: str = "BF16"
) -> list[tuple[str, tuple[int, ...], str]]:
    """The stored tensors for one MLX parameter: [(name, shape, safetensors dtype)]."""
    if bits is None or len(shape) != 2:
        return [(name, shape, float_dtype)]
    gs = QUANT_GROUP_SIZE[bits]
    rows, cols = shape
    if cols % gs:
        raise ConvertError(f"cannot quantize {name} {list(shape)}: {cols} is not a multiple of the group size {gs}")
    base = name[: -len(".weight")]
    return [
        (f"{base}.weight", (rows, cols * bits // 32), "U32"),
        (f"{base}.scales", (rows, cols // gs), "BF16"),
        (f"{base}.biases", (rows, cols // gs), "BF16"),
    ]


def output_specs(
    pieces: list[Piece], bits: int | None, float_dtype: str = "BF16"
) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of the file the conversion writes (dtype as safetensors spells it)."""
    if bits not in (None, 4, 8):
        raise ConvertError(f"-q must be 4 or 8, got {bits}")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for p in pieces:
        for name, shape, dtype in _quantized_parts(p.name, p.shape, bits, float_dtype):
            out[name] = (shape, dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# config.json

# Keys fixed by the tensor shapes: a --config value for them must agree with the checkpoint.
_SHAPE_KEYS = ("dim", "num_layers", "text_card", "card", "n_q", "dep_q", "depformer_dim", "depformer_num_layers")


def build_config(d: Dims, user: dict | None = None) -> tuple[Any, dict, list[str]]:
    """LmConfig + Kyutai config.json dict for the checkpoint; user values fill what the shapes don't show.

    Returns (LmConfig, config_json_dict, notes about assumed values).
    """
    from .models.config import LmConfig

    notes: list[str] = []
    if d.text_in != d.text_out + 1:
        raise ConvertError(f"text_emb has {d.text_in} rows but text_linear {d.text_out}: expected text_card + 1")
    if d.gating:
        ff = ffn_nominal_size(d.dim, d.hidden)
        if ff is None:
            raise ConvertError(f"temporal FFN hidden size {d.hidden} cannot be described in config.json")
        hidden_scale = 4.125 if ff == 4 * d.dim else ff / d.dim
        dep_ff = ffn_nominal_size(d.dep_dim, d.dep_hidden)
    else:
        hidden_scale, dep_ff = d.hidden / d.dim, d.dep_hidden  # a plain MLP's hidden size is the feed-forward size
    if dep_ff is None:
        raise ConvertError(f"depformer FFN hidden size {d.dep_hidden} cannot be described in config.json")
    user_norm = (user or {}).get("norm")
    if user_norm is not None and not str(user_norm).startswith(d.norm):
        raise ConvertError(f"--config has norm={user_norm!r} but the checkpoint's norms are {d.norm}")
    derived = {
        "dim": d.dim,
        "num_layers": d.num_layers,
        "text_card": d.text_out,
        "card": d.audio_vocab - 1,
        "n_q": d.n_q,
        "dep_q": d.dep_q,
        "depformer_dim": d.dep_dim,
        "depformer_num_layers": d.dep_layers,
        "depformer_dim_feedforward": dep_ff,
        "hidden_scale": hidden_scale,
        "gating": "silu" if d.gating else "none",
        "norm": user_norm or ("rms_norm_f32" if d.norm == "rms_norm" else "layer_norm"),
        "depformer_low_rank_embeddings": d.low_rank,
    }
    user = dict(user or {})
    if isinstance(user.get("transformer"), dict):  # our own nested LmConfig.to_dict() form
        try:
            extra = {k: v for k, v in user.items() if k not in ("transformer", "depformer")}
            extra = {k: v for k, v in extra.items() if k in ("moshi_name", "mimi_name", "tokenizer_name")}
            user = {**LmConfig.from_dict(user).to_kyutai_dict(), **extra}
        except Exception as e:
            raise ConvertError(f"--config: not a usable LM config ({e})") from None
    for key in (*_SHAPE_KEYS, "depformer_dim_feedforward"):
        if key in user and (not isinstance(user[key], int) or isinstance(user[key], bool)):
            raise ConvertError(f"--config has {key}={user[key]!r}; expected an integer")
    for key in _SHAPE_KEYS:
        if key in user and user[key] != derived[key]:
            raise ConvertError(f"--config has {key}={user[key]} but the checkpoint's tensors give {derived[key]}")
    if "depformer_dim_feedforward" in user:
        ff = user["depformer_dim_feedforward"]
        got = ffn_hidden_dim(d.dep_dim, ff, d.gating)
        if got != d.dep_hidden:
            raise ConvertError(
                f"--config has depformer_dim_feedforward={ff} (hidden {got}) but the checkpoint's is {d.dep_hidden}"
            )
        derived["depformer_dim_feedforward"] = ff
    defaults: dict[str, Any] = {
        "num_heads": d.dim // 128,
        "depformer_num_heads": d.dep_dim // 64,
        "context": 3000,
        "max_period": 10000,
        "positional_embedding": "rope",
        "depformer_context": d.dep_q,
        "depformer_max_period": 10000,
        "depformer_pos_emb": "none",
    }
    if d.n_q % d.dep_q == 0:
        defaults["delays"] = [0] + ([0] + [1] * (d.dep_q - 1)) * (d.n_q // d.dep_q)
    assumed = [k for k in defaults if k not in user]
    if "num_heads" in assumed:
        if d.dim % 128:
            raise ConvertError(f"the weights do not record num_heads (dim {d.dim}): pass --config with num_heads")
        notes.append(f"num_heads={defaults['num_heads']} (head dim 128)")
    if "depformer_num_heads" in assumed:
        if d.dep_dim % 64:
            raise ConvertError(
                f"the weights do not record depformer_num_heads (dim {d.dep_dim}): pass --config with it"
            )
        notes.append(f"depformer_num_heads={defaults['depformer_num_heads']} (head dim 64)")
    if "delays" in assumed:
        if "delays" not in defaults:
            raise ConvertError("the weights do not record the codebook delays: pass --config with delays")
        notes.append("delays as Moshi 7B (0 for text and each stream's first codebook, 1 for the rest)")
    for k in ("context", "max_period", "positional_embedding"):
        if k in assumed:
            notes.append(f"{k}={defaults[k]}")
    merged = {**defaults, **user, **derived}
    if len(merged["delays"]) != d.n_q + 1:
        raise ConvertError(f"delays has {len(merged['delays'])} entries; expected n_q + 1 = {d.n_q + 1}")
    try:
        cfg = LmConfig.from_dict(merged)
    except Exception as e:
        raise ConvertError(f"cannot build the LM config: {e}") from None
    out = dict(cfg.to_kyutai_dict())
    for k, v in merged.items():
        out.setdefault(k, v)
    return cfg, out, notes


def expected_specs(cfg: Any, bits: int | None, float_dtype: str = "BF16") -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of the model's parameters, from a lazily built Lm (nothing is allocated)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from .models.lm import Lm

    model = Lm(cfg)
    model.set_dtype(mx.float32 if float_dtype == "F32" else mx.bfloat16)
    if bits is not None:
        nn.quantize(model, bits=bits, group_size=QUANT_GROUP_SIZE[bits])
    names = {mx.bfloat16: "BF16", mx.uint32: "U32", mx.float32: "F32", mx.float16: "F16"}
    return {k: (tuple(v.shape), names.get(v.dtype, str(v.dtype))) for k, v in tree_flatten(model.parameters())}


def _check_against_model(
    cfg: Any, specs: dict[str, tuple[tuple[int, ...], str]], bits: int | None, float_dtype: str = "BF16"
) -> None:
    try:
        want = expected_specs(cfg, bits, float_dtype)
    except ImportError:  # pragma: no cover - model code unavailable: the shape checks above still hold
        return
    if set(want) != set(specs):
        extra, lack = sorted(set(specs) - set(want)), sorted(set(want) - set(specs))
        what = f"would write {extra[0]} the model does not have" if extra else f"lacks {lack[0]} the model needs"
        raise ConvertError(f"internal mapping error: the output {what}")
    for k, v in want.items():
        if specs[k] != v:
            raise ConvertError(f"internal mapping error: {k} would be {specs[k]}, the model expects {v}")


# ---------------------------------------------------------------------------------------------------------
# streaming conversion


class _Writer:
    """Writes a safetensors file whose header is known before any data."""

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], str]], order: list[str]) -> None:
        sizes = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}
        header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
        offset = 0
        self.expected: dict[str, int] = {}
        spans: dict[str, list[int]] = {}
        for name in order:
            shape, dtype = specs[name]
            n = math.prod(shape) * sizes[dtype]
            spans[name] = [offset, offset + n]
            self.expected[name] = n
            offset += n
        for name in sorted(specs):
            shape, dtype = specs[name]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": spans[name]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.header_bytes = 8 + len(raw)
        self.total = self.header_bytes + offset
        self.order = order
        self.pos = 0
        self.f = open(path, "wb")
        self.f.write(len(raw).to_bytes(8, "little"))
        self.f.write(raw)

    def write(self, name: str, data: memoryview | bytes) -> int:
        want = self.order[self.pos]
        if name != want or len(data) != self.expected[name]:
            raise RuntimeError(f"writer out of step: got {name} ({len(data)} bytes), expected {want}")
        self.f.write(data)
        self.pos += 1
        return len(data)

    def close(self) -> None:
        self.f.close()


def _progress(total: int, enabled: bool, desc: str):
    return cli.Progress(enabled).bar(total, desc, unit="B", unit_scale=True, unit_divisor=1024)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def convert(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    bits: int | None = None,
    config: str | os.PathLike | dict | None = None,
    progress: bool = True,
    log: Any = None,
    force: bool = False,
    dtype: str = "bf16",
) -> Path:
    """Convert `src` into OUT_DIR/model[.qN].safetensors + OUT_DIR/config.json; returns the weights path.

    `dtype` ("bf16" as published, or "f32") is the precision of the unquantized output.
    OUT_DIR is created if missing; an existing one must be empty unless ``force``. Neither output may
    be an input file (checked even with ``force``); both appear only once complete.
    """
    say = log if log is not None else cli.say
    src = Path(src)
    if src.is_dir():
        raise ConvertError(f"{src}: is a directory; give the checkpoint's .safetensors file")
    if not src.is_file():
        raise ConvertError(f"{src}: no such file")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and not force and any(out_dir.iterdir()):
        raise ConvertError(f"{out_dir}: folder is not empty (--force writes into it, replacing same-named files)")
    if bits not in (None, 4, 8):
        raise ConvertError(f"-q must be 4 or 8, got {bits}")
    if dtype not in FLOAT_DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    if bits is not None and dtype != "bf16":
        raise ConvertError("--dtype f32 is for unquantized output; quantized files keep bfloat16 scales as published")
    float_dtype = FLOAT_DTYPES[dtype]
    try:
        tensors, _ = read_tensor_infos(src)
    except WeightsError as e:
        raise ConvertError(str(e)) from None
    user_config: dict | None = None
    if isinstance(config, dict):
        user_config = config
    elif config is not None:
        try:
            user_config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"--config {config}: cannot read JSON ({e.__class__.__name__})") from None
        if not isinstance(user_config, dict):
            raise ConvertError(f"--config {config}: expected a JSON object")
    schedule = (user_config or {}).get("depformer_weights_per_step_schedule")
    if schedule is not None and not (isinstance(schedule, list) and all(isinstance(i, int) and i >= 0 for i in schedule)):
        raise ConvertError(f"--config has depformer_weights_per_step_schedule={schedule!r}; expected a list of indices")
    try:
        plan = plan_conversion({name: info.shape for name, info in tensors.items()}, schedule)
    except ConvertError as e:
        raise ConvertError(f"{src}: {e}") from None
    for name in {p.source for p in plan.pieces}:
        source_dtype = tensors[name].dtype
        if source_dtype not in _SOURCE_DTYPES:
            raise ConvertError(
                f"{src}: tensor {name} has dtype {source_dtype}; expected one of {', '.join(_SOURCE_DTYPES)}"
            )
    cfg, cfg_json, notes = build_config(plan.dims, user_config)
    specs = output_specs(plan.pieces, bits, float_dtype)
    _check_against_model(cfg, specs, bits, float_dtype)

    # Data order: source by source, so each source tensor is read exactly once.
    groups: OrderedDict[str, list[Piece]] = OrderedDict()
    for p in plan.pieces:
        groups.setdefault(p.source, []).append(p)
    order = [n for ps in groups.values() for p in ps for n, _, _ in _quantized_parts(p.name, p.shape, bits, float_dtype)]

    out_name = MOSHI_NAMES[bits]
    out_path = out_dir / out_name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        inputs = [src] + ([config] if isinstance(config, (str, os.PathLike)) else [])
        out_real, cfg_real = check_outputs(inputs=inputs, outputs=[out_path, out_dir / "config.json"])
    except OutputError as e:
        raise ConvertError(str(e)) from None
    except OSError as e:
        raise ConvertError(f"{out_dir}: cannot be created ({e.strerror or e})") from None
    kind = dtype if bits is None else f"{bits}-bit (group size {QUANT_GROUP_SIZE[bits]})"
    say(f"converting {src} ({plan.layout} layout, {len(tensors)} tensors) -> {out_path} [{kind}]")
    if notes:
        say("not recorded in the weights, assumed (set with --config): " + "; ".join(notes))

    with atomic_output(out_real) as partial:  # the file appears only once complete
        _write_weights(partial, src, tensors, groups, specs, order, bits, float_dtype, progress, out_name)
    cfg_json = {"moshi_name": out_name, **{k: v for k, v in cfg_json.items() if k != "moshi_name"}}
    if bits is not None:  # written down, as mlx-lm does, so loading need not infer it from shapes
        cfg_json["quantization"] = Quantization(bits, QUANT_GROUP_SIZE[bits]).to_dict()
    with atomic_output(cfg_real) as tmp:
        tmp.write_text(json.dumps(cfg_json, indent=2) + "\n", encoding="utf-8")
    say(f"wrote {out_path} ({_size(out_real.stat().st_size)}, {len(specs)} tensors) and {out_dir / 'config.json'}")
    return out_path


def _write_weights(
    partial: Path, src: Path, tensors: dict, groups: "OrderedDict[str, list[Piece]]", specs: dict,
    order: list[str], bits: int | None, float_dtype: str, progress: bool, out_name: str,
) -> None:
    """Stream the converted tensors into ``partial``, one source tensor at a time."""
    import mlx.core as mx
    import numpy as np

    writer = _Writer(partial, specs, order)
    bar = _progress(writer.total, progress, out_name)
    bar.update(writer.header_bytes)
    try:
        source_arrays = mx.load(str(src))  # lazy: each tensor is read from the file when first evaluated
        for source, pieces in groups.items():
            shape = tensors[source].shape
            x = source_arrays.pop(source)  # popped so each tensor's data is freed once converted
            x = x.astype(mx.float32 if float_dtype == "F32" else mx.bfloat16)
            for p in pieces:
                y = x
                if p.chunk is not None:
                    i, n = p.chunk
                    rows = shape[0] // n
                    y = y[i * rows : (i + 1) * rows]
                y = y.reshape(p.shape)
                parts = [y] if bits is None or len(p.shape) != 2 else list(
                    mx.quantize(y, group_size=QUANT_GROUP_SIZE[bits], bits=bits)
                )
                mx.eval(parts)
                for (name, _, _), t in zip(_quantized_parts(p.name, p.shape, bits, float_dtype), parts):
                    arr = np.ascontiguousarray(np.asarray(t.view(mx.uint16) if t.dtype == mx.bfloat16 else t))
                    bar.update(writer.write(name, memoryview(arr).cast("B")))
                del parts, y
            del x
        writer.close()
        if partial.stat().st_size != writer.total:
            raise RuntimeError(f"wrote {partial.stat().st_size} bytes, expected {writer.total}")
    finally:
        writer.close()
        bar.close()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m moshi_mlx.convert",
        description="Convert a PyTorch Moshi checkpoint (e.g. model.safetensors of kyutai/moshiko-pytorch-bf16) "
        "to the MLX layout, optionally quantized like the published kyutai/moshiko-mlx-q4/-q8 files.",
    )
    ap.add_argument("input", help="PyTorch Moshi .safetensors (or an MLX bf16 one to quantize)")
    ap.add_argument("out_dir", help="directory for model[.q4|.q8].safetensors and config.json")
    ap.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None, help="quantize to 4 or 8 bits")
    ap.add_argument(
        "--config", default=None, metavar="JSON",
        help="Kyutai LM config.json for what the weights do not record (num_heads, context, delays, ...)",
    )
    ap.add_argument(
        "--dtype", choices=sorted(FLOAT_DTYPES), default="bf16",
        help="precision of the unquantized output (default bf16, as published)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR (never over an input)")
    cli.add_verbose_arg(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    convert(
        args.input, args.out_dir, bits=args.quantize, config=args.config, progress=not args.no_progress,
        force=args.force, dtype=args.dtype, log=cli.say,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
