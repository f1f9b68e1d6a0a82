"""Kyutai's PyTorch Moshi checkpoint, read from its tensor names and shapes alone (no file, no data).

`plan_conversion({name: shape})` says which MLX tensor each PyTorch tensor becomes and reads the model's sizes
(`Dims`) off the shapes; `moshi_mlx.models.pytorch_config` turns those sizes into a config.json, and
`moshi_mlx.model_files.convert` streams the actual tensors. Being pure, the plan is checked against the 7B
manifests without any weights.

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
    {transformer,depformer}.layers.{l}.linear{1,2}.weight (gating "none": a plain MLP)
                                -> ....gating.linear{1,2}.weight (depformer: copied to every slice)
    {transformer,depformer}.layers.{l}.layer_scale_{1,2}.scale  -> same names (depformer: every slice)
    depformer_norms.{k}.{alpha | weight, bias}      -> depformer.slices.{k}.out_norm.{weight, bias}
    extra_heads.{i}.weight                          -> same names
A text-only model (dep_q 0, no linears.*) has no depformer; its unused depformer_in.* (if any) are dropped.
    condition_provider.conditioners.{name}.{embed.weight, output_proj.weight, learnt_padding} -> same names
LayerNorm weights and biases keep their names. With kv_repeat, in_proj has dim + 2 * kv_dim rows (queries, then
the key/value heads' keys and values), as in PyTorch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import MoshiError

__all__ = ["ConvertError", "Dims", "Piece", "Plan", "detect_layout", "plan_conversion"]

Shapes = dict[str, tuple[int, ...]]


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
    dep_gating: bool = True  # the depformer's own FFN kind (Kyutai's depformer_gating)
    kv_dim: int | None = None  # width of the keys (and of the values) when smaller than dim: kv_repeat
    dep_kv_dim: int | None = None
    layer_scale: bool = False  # layer_scale_{1,2}.scale tensors in the temporal layers
    dep_layer_scale: bool = False
    dep_out_norm: str | None = None  # "rms_norm" / "layer_norm": Kyutai's depformer_norms.{k}
    extra_heads: int = 0
    extra_heads_dim: int = 0
    conditioners: tuple[tuple[str, int, int, bool], ...] = ()  # (name, table rows, table width, learnt padding)

    @property
    def kv_repeat(self) -> int:
        return self.dim // (self.kv_dim or self.dim)

    @property
    def dep_kv_repeat(self) -> int:
        return self.dep_dim // (self.dep_kv_dim or self.dep_dim)


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
# sizes


def _count(names: Iterable[str], pattern: str) -> int:
    """How many consecutive indices 0, 1, ... `pattern` (group 1 = the index) finds at the start of names."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for n in names if (m := rx.match(n))}
    n = 0
    while n in found:
        n += 1
    return n


def _need(shapes: Shapes, name: str, ndim: int) -> tuple[int, ...]:
    if name not in shapes:
        raise ConvertError(f"missing tensor {name}: not a complete Moshi checkpoint")
    shape = shapes[name]
    if len(shape) != ndim:
        raise ConvertError(f"tensor {name} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def detect_layout(names: Iterable[str]) -> str:
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


@dataclass(frozen=True)
class _Names:
    """Where a layout keeps what the sizes are read from, and the depformer counts it gives."""

    audio_emb: str
    dep_in0: str
    dep_out: tuple[str, ...]  # candidates for the depformer FFN's output weight (its hidden size)
    text_emb_dep: str
    plain_ffn_out: str  # a non-gated FFN's second linear, in layer 0
    dep_layer0: str  # prefix of the depformer's first layer (of its first slice, in the MLX layout)
    dep_attn0: str  # the depformer's first in_proj (one weight set)
    dep_out_norm: str  # the first step's output norm prefix
    n_q: int
    dep_q: int
    dep_in: int
    dep_sets: int
    dep_layers: int


def _pytorch_names(shapes: Shapes) -> _Names:
    dep_in0 = "depformer_in.0.weight"
    dep_sets = max(
        _count(shapes, r"depformer\.layers\.0\.self_attn\.in_projs\.(\d+)\.weight$"),
        _count(shapes, r"depformer\.layers\.0\.gating\.(\d+)\.linear_in\.weight$"),
    )
    stacked = "depformer.layers.0.self_attn.out_proj.weight"
    if not dep_sets and stacked in shapes:  # the older stacked form: rows of all sets in one tensor
        dep_sets = shapes[stacked][0] // shapes[dep_in0][0] if dep_in0 in shapes else 0
    return _Names(
        "emb.{}.weight", dep_in0,
        ("depformer.layers.0.gating.0.linear_out.weight", "depformer.layers.0.gating.linear_out.weight",
         "depformer.layers.0.linear2.weight"),
        "depformer_text_emb.weight", "transformer.layers.0.linear2.weight",
        "depformer.layers.0.", "depformer.layers.0.self_attn.in_projs.0.weight", "depformer_norms.0",
        n_q=_count(shapes, r"emb\.(\d+)\.weight$"),
        dep_q=_count(shapes, r"linears\.(\d+)\.weight$"),
        dep_in=_count(shapes, r"depformer_in\.(\d+)\.weight$"),
        dep_sets=dep_sets,
        dep_layers=_count(shapes, r"depformer\.layers\.(\d+)\."),
    )


def _mlx_names(shapes: Shapes) -> _Names:
    slices = _count(shapes, r"depformer\.slices\.(\d+)\.")
    return _Names(
        "audio_embs.{}.weight", "depformer.slices.0.linear_in.weight",
        ("depformer.slices.0.transformer.layers.0.gating.linear_out.weight",
         "depformer.slices.0.transformer.layers.0.gating.linear2.weight"),
        "depformer.slices.0.emb.weight", "transformer.layers.0.gating.linear2.weight",
        "depformer.slices.0.transformer.layers.0.", "depformer.slices.0.transformer.layers.0.self_attn.in_proj.weight",
        "depformer.slices.0.out_norm",
        n_q=_count(shapes, r"audio_embs\.(\d+)\.weight$"),
        dep_q=slices, dep_in=slices, dep_sets=slices,
        dep_layers=_count(shapes, r"depformer\.slices\.0\.transformer\.layers\.(\d+)\."),
    )


def _kv_dim(shapes: Shapes, names: tuple[str, ...], dim: int, sets: int = 1) -> int | None:
    """The key width read off an in_proj (dim + 2 * kv rows per weight set), None when it is dim."""
    name = next((n for n in names if n in shapes), None)
    if name is None:
        return None
    rows = shapes[name][0] // (sets if name.endswith("in_proj_weight") else 1)
    kv, odd = divmod(rows - dim, 2)
    if odd or kv <= 0 or dim % kv:
        raise ConvertError(f"tensor {name} has {shapes[name][0]} rows: not queries, keys and values for width {dim}")
    return None if kv == dim else kv


def _conditioners(shapes: Shapes) -> tuple[tuple[str, int, int, bool], ...]:
    prefix = "condition_provider.conditioners."
    found = sorted({n[len(prefix):].split(".")[0] for n in shapes if n.startswith(prefix)})
    out = []
    for name in found:
        rows, width = _need(shapes, f"{prefix}{name}.embed.weight", 2)
        out.append((name, rows, width, f"{prefix}{name}.learnt_padding" in shapes))
    return tuple(out)


def read_dims(shapes: Shapes, layout: str) -> Dims:
    """The model's sizes, from the shapes of a checkpoint in `layout` ("pytorch" or "mlx")."""
    names = _pytorch_names(shapes) if layout == "pytorch" else _mlx_names(shapes)
    layer0 = "transformer.layers.0."
    text_in, dim = _need(shapes, "text_emb.weight", 2)
    text_out = _need(shapes, "text_linear.weight", 2)[0]
    audio_vocab = _need(shapes, names.audio_emb.format(0), 2)[0]
    num_layers = _count(shapes, r"transformer\.layers\.(\d+)\.")
    if num_layers == 0:
        raise ConvertError("missing tensors transformer.layers.0.*: not a complete Moshi checkpoint")
    gating = not any(n.startswith(layer0 + "linear1.") or n.startswith(layer0 + "gating.linear1.") for n in shapes)
    hidden = _need(shapes, layer0 + "gating.linear_out.weight" if gating else names.plain_ffn_out, 2)[1]
    norm = "layer_norm" if layer0 + "norm1.bias" in shapes else "rms_norm"
    extra = _count(shapes, r"extra_heads\.(\d+)\.weight$")
    common: dict[str, Any] = {
        "kv_dim": _kv_dim(shapes, (layer0 + "self_attn.in_projs.0.weight", layer0 + "self_attn.in_proj_weight",
                                   layer0 + "self_attn.in_proj.weight"), dim),
        "layer_scale": layer0 + "layer_scale_1.scale" in shapes,
        "extra_heads": extra,
        "extra_heads_dim": _need(shapes, "extra_heads.0.weight", 2)[0] if extra else 0,
        "conditioners": _conditioners(shapes),
    }
    if names.dep_q == 0 and names.dep_layers == 0 and names.text_emb_dep not in shapes:
        # A text-only model (dep_q 0, e.g. Kyutai's STT): no depformer. Kyutai still builds one unused
        # depformer_in projection when depformer_multi_linear is off; `dep_in` counts it, the plan drops it.
        return Dims(dim, num_layers, hidden, text_in, text_out, audio_vocab, names.n_q, 0, 0, 0, 0, norm, gating,
                    dep_in=names.dep_in, **common)
    if names.dep_q == 0 or names.dep_layers == 0:
        raise ConvertError("depformer tensors without their output heads (linears.*), or heads without a depformer: "
                           "not a complete Moshi checkpoint")
    dep_dim = _need(shapes, names.dep_in0, 2)[0]
    dep_gating = not any(n.startswith((names.dep_layer0 + "linear1.", names.dep_layer0 + "gating.linear1.")) for n in shapes)
    dep_hidden = _need(shapes, next((n for n in names.dep_out if n in shapes), names.dep_out[0]), 2)[1]
    rank = _need(shapes, names.text_emb_dep, 2)[1]
    sets = max(names.dep_sets, 1)
    dep_norm = names.dep_out_norm
    if f"{dep_norm}.bias" in shapes:
        dep_out_norm: str | None = "layer_norm"
    elif f"{dep_norm}.alpha" in shapes or f"{dep_norm}.weight" in shapes:
        dep_out_norm = "rms_norm"
    else:
        dep_out_norm = None
    return Dims(
        dim, num_layers, hidden, text_in, text_out, audio_vocab, names.n_q, names.dep_q, dep_dim,
        names.dep_layers, dep_hidden, norm, gating, rank if rank != dep_dim else None, names.dep_in, sets,
        dep_gating=dep_gating,
        dep_kv_dim=_kv_dim(shapes, (names.dep_attn0, names.dep_layer0 + "self_attn.in_proj_weight"), dep_dim,
                           sets),
        dep_layer_scale=names.dep_layer0 + "layer_scale_1.scale" in shapes,
        dep_out_norm=dep_out_norm,
        **common,
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


# ---------------------------------------------------------------------------------------------------------
# the name plan


class _Planner:
    """Collects the pieces; a candidate is (source, source_shape) or (source, source_shape, (index, count))."""

    def __init__(self, shapes: Shapes, layout: str, dims: Dims) -> None:
        self.shapes, self.layout, self.d = shapes, layout, dims
        self.pieces: list[Piece] = []
        self.missing: list[str] = []
        self.used: set[str] = set()

    def add(self, name: str, shape: tuple[int, ...], *candidates: tuple) -> None:
        """The first candidate present wins; an MLX input maps every name to itself."""
        if self.layout == "mlx":
            candidates = ((name, shape),)
        for cand in candidates:
            src, src_shape = cand[0], tuple(cand[1])
            if src in self.shapes:
                if self.shapes[src] != src_shape:
                    raise ConvertError(f"tensor {src} has shape {list(self.shapes[src])}, expected {list(src_shape)}")
                self.pieces.append(Piece(name, shape, src, cand[2] if len(cand) > 2 else None))
                self.used.add(src)
                return
        self.missing.append(candidates[0][0])

    def same(self, name: str, shape: tuple[int, ...], source: str | None = None) -> None:
        self.add(name, shape, (source or name, shape))

    def norm(self, name: str, source: str, n: int, kind: str | None = None) -> None:
        """RMSNorm alpha [1, 1, n] -> weight [n]; LayerNorm weight and bias keep their names."""
        if (kind or self.d.norm) == "layer_norm":
            self.same(f"{name}.weight", (n,), f"{source}.weight")
            self.same(f"{name}.bias", (n,), f"{source}.bias")
        else:
            self.add(f"{name}.weight", (n,), (f"{source}.alpha", (1, 1, n)))

    def ffn(self, name: str, source: str, n: int, h: int, gated: bool) -> None:
        """Gated: gating.linear_in/out; plain: PyTorch linear1/linear2 -> gating.linear1/linear2."""
        if gated:
            self.same(f"{name}.gating.linear_in.weight", (2 * h, n), f"{source}.linear_in.weight")
            self.same(f"{name}.gating.linear_out.weight", (n, h), f"{source}.linear_out.weight")
        else:
            plain = re.sub(r"\.gating(\.\d+)?$", "", source)
            self.same(f"{name}.gating.linear1.weight", (h, n), f"{plain}.linear1.weight")
            self.same(f"{name}.gating.linear2.weight", (n, h), f"{plain}.linear2.weight")

    def layer_scale(self, name: str, source: str, n: int) -> None:
        for i in (1, 2):
            self.same(f"{name}.layer_scale_{i}.scale", (n,), f"{source}.layer_scale_{i}.scale")

    def emb(self, name: str, source: str, vocab: int) -> None:
        d = self.d
        if d.low_rank is None:
            self.same(f"{name}.weight", (vocab, d.dep_dim), f"{source}.weight")
        else:
            self.same(f"{name}.weight", (vocab, d.low_rank), f"{source}.weight")
            self.same(f"{name}.low_rank.weight", (d.dep_dim, d.low_rank), f"{source}.low_rank.weight")

    def attention(self, name: str, source: str, n: int, kv: int, j: int = 0, sets: int | None = None) -> None:
        """in_projs.{j} / out_projs.{j}, or the older stacked tensors: whole, or row block j of `sets`."""
        chunk = () if sets is None else ((j, sets),)
        rows = sets or 1
        in_rows = n + 2 * kv
        self.add(
            f"{name}.self_attn.in_proj.weight", (in_rows, n),
            (f"{source}.self_attn.in_projs.{j}.weight", (in_rows, n)),
            (f"{source}.self_attn.in_proj_weight", (rows * in_rows, n), *chunk),
        )
        self.add(
            f"{name}.self_attn.out_proj.weight", (n, n),
            (f"{source}.self_attn.out_projs.{j}.weight", (n, n)),
            (f"{source}.self_attn.out_proj.weight", (rows * n, n), *chunk),
        )

    def temporal(self) -> None:
        d = self.d
        self.same("text_emb.weight", (d.text_in, d.dim))
        for i in range(d.n_q):
            self.same(f"audio_embs.{i}.weight", (d.audio_vocab, d.dim), f"emb.{i}.weight")
        for l in range(d.num_layers):
            p = f"transformer.layers.{l}"
            self.attention(p, p, d.dim, d.kv_dim or d.dim)
            for n in ("norm1", "norm2"):
                self.norm(f"{p}.{n}", f"{p}.{n}", d.dim)
            self.ffn(p, f"{p}.gating", d.dim, d.hidden, d.gating)
            if d.layer_scale:
                self.layer_scale(p, p, d.dim)
        self.norm("out_norm", "out_norm", d.dim)
        self.same("text_linear.weight", (d.text_out, d.dim))
        for i in range(d.extra_heads):
            self.same(f"extra_heads.{i}.weight", (d.extra_heads_dim, d.dim))
        for name, rows, width, padding in d.conditioners:
            p = f"condition_provider.conditioners.{name}"
            self.same(f"{p}.embed.weight", (rows, width))
            self.same(f"{p}.output_proj.weight", (d.dim, width))
            if padding:
                self.same(f"{p}.learnt_padding", (1, 1, d.dim))

    def depformer_step(self, k: int, in_src: int, j: int) -> None:
        """Slice k: its embedding, projections in and out, and its layers from weight set j."""
        d, D = self.d, self.d.dep_dim
        s = f"depformer.slices.{k}"
        if k == 0:
            self.emb(f"{s}.emb", "depformer_text_emb", d.text_in)
        else:
            self.emb(f"{s}.emb", f"depformer_emb.{k - 1}", d.audio_vocab)
        self.same(f"{s}.linear_in.weight", (D, d.dim), f"depformer_in.{in_src}.weight")
        if d.dep_out_norm is not None:
            self.norm(f"{s}.out_norm", f"depformer_norms.{k}", D, d.dep_out_norm)
        self.same(f"{s}.linear_out.weight", (d.audio_vocab - 1, D), f"linears.{k}.weight")
        for l in range(d.dep_layers):
            q, t = f"depformer.layers.{l}", f"{s}.transformer.layers.{l}"
            self.attention(t, q, D, d.dep_kv_dim or D, j, d.dep_sets)
            for n in ("norm1", "norm2"):
                self.norm(f"{t}.{n}", f"{q}.{n}", D)
            per_step = f"{q}.gating.{j}.linear_in.weight" in self.shapes
            self.ffn(t, f"{q}.gating.{j}" if per_step else f"{q}.gating", D, d.dep_hidden, d.dep_gating)
            if d.dep_layer_scale:
                self.layer_scale(t, q, D)

    def check_complete(self) -> None:
        if self.missing:
            more = f" (and {len(self.missing) - 1} more)" if len(self.missing) > 1 else ""
            raise ConvertError(f"missing tensor {self.missing[0]}{more}: not a complete Moshi checkpoint")
        unexpected = sorted(set(self.shapes) - self.used)
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise ConvertError(
                f"unexpected tensor {unexpected[0]}{more}: not a Moshi checkpoint layout this converter knows"
            )


def plan_conversion(shapes: dict[str, Any], schedule: list[int] | None = None) -> Plan:
    """Map a checkpoint's {name: shape} to the MLX tensors it becomes; raises ConvertError on any mismatch.

    `schedule` (config.json's depformer_weights_per_step_schedule) says which stored depformer weight set each
    step uses when steps share them; the MLX layout gets a copy per step.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    layout = detect_layout(shapes)
    d = read_dims(shapes, layout)
    if schedule is not None and len(schedule) != d.dep_q:
        raise ConvertError(f"depformer_weights_per_step_schedule has {len(schedule)} entries; the model has {d.dep_q} steps")
    planner = _Planner(shapes, layout, d)
    planner.temporal()
    if d.dep_q == 0:  # text-only: the unused depformer_in projections Kyutai builds are left out
        planner.used.update(f"depformer_in.{i}.weight" for i in range(d.dep_in))
        planner.check_complete()
        return Plan(layout, d, planner.pieces)
    in_src = _step_sources(d.dep_in, d.dep_q, schedule, "input projections")
    set_src = _step_sources(d.dep_sets, d.dep_q, schedule, "weight sets")
    for k in range(d.dep_q):
        planner.depformer_step(k, in_src[k], set_src[k])
    planner.check_complete()
    return Plan(layout, d, planner.pieces)
