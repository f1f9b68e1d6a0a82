"""Streaming conversion of a PyTorch Moshi checkpoint into the MLX layout, optionally quantized.

`moshi_mlx.models.pytorch` plans which MLX tensor each source tensor becomes; this module does the file work:
one source tensor is read, turned into its MLX tensors, quantized if asked, written, and dropped before the
next one, so memory stays at the size of the largest tensor. The output's header is known before any data (it
is checked against a lazily built model first), and both outputs appear only once complete.

Status lines go to `log`, the bytes written to `progress(done, total)`: the command supplies both.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from ..models.config import ConfigError, LmConfig, check_kyutai_keys
from ..models.lm import quantizes
from ..models.pytorch import ConvertError, Piece, Plan, plan_conversion
from ..models.pytorch_config import build_config
from ..outputs import OutputError, atomic_output, check_outputs
from .checkpoint import (
    FLOAT_DTYPES,
    GROUP_SIZE_FOR_BITS,
    SHORT_DTYPES,
    Quantization,
    WeightsError,
    read_tensor_infos,
)
from .depformer_steps import check_count, keep_steps, trimmed_config
from .hub import MOSHI_NAMES
from .lora import LoraAdapter, config_without_lora, read_adapter

__all__ = ["OUTPUT_DTYPES", "convert", "expected_specs", "output_specs", "quantized_parts"]

Specs = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, safetensors dtype)

_SOURCE_DTYPES = ("BF16", "F16", "F32")
#: --dtype of the unquantized output: bf16 as published, or f32 (float16 could overflow bf16 weights).
OUTPUT_DTYPES = ("bf16", "f32")
_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}


def _code(dtype: str) -> str:
    """Safetensors code of a short --dtype name (bf16 -> BF16)."""
    return FLOAT_DTYPES[SHORT_DTYPES[dtype]][2]


def quantized_parts(
    name: str, shape: tuple[int, ...], bits: int | None, float_dtype: str = "BF16"
) -> list[tuple[str, tuple[int, ...], str]]:
    """The stored tensors for one MLX parameter: [(name, shape, safetensors dtype)]."""
    if bits is None or len(shape) != 2 or not quantizes(name):
        return [(name, shape, float_dtype)]
    gs = GROUP_SIZE_FOR_BITS[bits]
    rows, cols = shape
    if cols % gs:
        raise ConvertError(f"cannot quantize {name} {list(shape)}: {cols} is not a multiple of the group size {gs}")
    base = name[: -len(".weight")]
    return [
        (f"{base}.weight", (rows, cols * bits // 32), "U32"),
        (f"{base}.scales", (rows, cols // gs), "BF16"),
        (f"{base}.biases", (rows, cols // gs), "BF16"),
    ]


def output_specs(pieces: list[Piece], bits: int | None, float_dtype: str = "BF16") -> Specs:
    """{name: (shape, dtype)} of the file the conversion writes (dtype as safetensors spells it)."""
    if bits not in (None, 4, 8):
        raise ConvertError(f"-q must be 4 or 8, got {bits}")
    out: Specs = {}
    for p in pieces:
        for name, shape, dtype in quantized_parts(p.name, p.shape, bits, float_dtype):
            out[name] = (shape, dtype)
    return out


def expected_specs(cfg: LmConfig, bits: int | None, float_dtype: str = "BF16") -> Specs:
    """{name: (shape, dtype)} of the model's parameters, from a lazily built Lm (nothing is allocated)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from ..models.lm import Lm, quantize_predicate

    model = Lm(cfg)
    model.set_dtype(mx.float32 if float_dtype == "F32" else mx.bfloat16)
    if bits is not None:
        nn.quantize(model, bits=bits, group_size=GROUP_SIZE_FOR_BITS[bits], class_predicate=quantize_predicate)
    names = {mx.bfloat16: "BF16", mx.uint32: "U32", mx.float32: "F32", mx.float16: "F16"}
    return {k: (tuple(v.shape), names.get(v.dtype, str(v.dtype))) for k, v in tree_flatten(model.parameters())}


def _check_against_model(cfg: LmConfig, specs: Specs, bits: int | None, float_dtype: str) -> None:
    """The plan's output must be exactly what the model loads: a mapping bug stops before any writing."""
    want = expected_specs(cfg, bits, float_dtype)
    if set(want) != set(specs):
        extra, lack = sorted(set(specs) - set(want)), sorted(set(want) - set(specs))
        what = f"would write {extra[0]} the model does not have" if extra else f"lacks {lack[0]} the model needs"
        raise ConvertError(f"internal mapping error: the output {what}")
    for k, v in want.items():
        if specs[k] != v:
            raise ConvertError(f"internal mapping error: {k} would be {specs[k]}, the model expects {v}")


class _Writer:
    """Writes a safetensors file whose header is known before any data."""

    def __init__(self, path: Path, specs: Specs, order: list[str]) -> None:
        offset = 0
        self.expected: dict[str, int] = {}
        spans: dict[str, list[int]] = {}
        for name in order:
            shape, dtype = specs[name]
            n = math.prod(shape) * _BYTES[dtype]
            spans[name] = [offset, offset + n]
            self.expected[name] = n
            offset += n
        header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
        for name in sorted(specs):
            shape, dtype = specs[name]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": spans[name]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writers do
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


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_request(src: Path, out_dir: Path, bits: int | None, dtype: str, force: bool) -> None:
    """Refuse what cannot work before reading anything."""
    if src.is_dir():
        raise ConvertError(f"{src}: is a directory; give the checkpoint's .safetensors file")
    if not src.is_file():
        raise ConvertError(f"{src}: no such file")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and not force and any(out_dir.iterdir()):
        raise ConvertError(f"{out_dir}: folder is not empty (--force writes into it, replacing same-named files)")
    if bits not in (None, 4, 8):
        raise ConvertError(f"-q must be 4 or 8, got {bits}")
    if dtype not in OUTPUT_DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    if bits is not None and dtype != "bf16":
        raise ConvertError("--dtype f32 is for unquantized output; quantized files keep bfloat16 scales as published")


def _user_config(config: str | os.PathLike | dict | None) -> dict | None:
    """--config as a dict (a path is read as JSON), its schedule checked."""
    user: Any = config
    if config is not None and not isinstance(config, dict):
        try:
            user = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"--config {config}: cannot read JSON ({e.__class__.__name__})") from None
        if not isinstance(user, dict):
            raise ConvertError(f"--config {config}: expected a JSON object")
    if user is not None and not isinstance(user.get("transformer"), dict):  # Kyutai's flat keys: refuse early
        try:
            check_kyutai_keys(user)
        except ConfigError as e:
            raise ConvertError(f"--config: {e}") from None
    schedule = (user or {}).get("depformer_weights_per_step_schedule")
    if schedule is not None and not (isinstance(schedule, list) and all(isinstance(i, int) and i >= 0 for i in schedule)):
        raise ConvertError(f"--config has depformer_weights_per_step_schedule={schedule!r}; expected a list of indices")
    return user


def _plan(src: Path, tensors: dict, schedule: list[int] | None) -> Plan:
    """The name plan for the file's tensors, whose dtypes must be floats."""
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
    return plan


def _outputs(src: Path, config: Any, out_dir: Path, out_path: Path, lora: Any = None) -> tuple[Path, Path]:
    """Create OUT_DIR and check that neither output is an input (even with --force)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        inputs = [src] + [p for p in (config, lora) if isinstance(p, (str, os.PathLike))]
        out_real, cfg_real = check_outputs(inputs=inputs, outputs=[out_path, out_dir / "config.json"])
    except OutputError as e:
        raise ConvertError(str(e)) from None
    except OSError as e:
        raise ConvertError(f"{out_dir}: cannot be created ({e.strerror or e})") from None
    return out_real, cfg_real


def convert(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    bits: int | None = None,
    config: str | os.PathLike | dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    force: bool = False,
    dtype: str = "bf16",
    lora: str | os.PathLike | None = None,
    max_out_n_q: int | None = None,
) -> Path:
    """Convert `src` into OUT_DIR/model[.qN].safetensors + OUT_DIR/config.json; returns the weights path.

    `dtype` ("bf16" as published, or "f32") is the precision of the unquantized output.
    OUT_DIR is created if missing; an existing one must be empty unless ``force``. Neither output may
    be an input file (checked even with ``force``); both appear only once complete.
    `log` takes status lines (default: the "moshi_mlx" logger), `progress(done, total)` the bytes written.
    `lora`: a LoRA adapter merged into the weights (`moshi_mlx.model_files.lora`); `max_out_n_q`: keep only
    the first depformer steps (`moshi_mlx.model_files.depformer_steps`).
    """
    say = log or logging.getLogger("moshi_mlx").info
    src, out_dir = Path(src), Path(out_dir)
    _check_request(src, out_dir, bits, dtype, force)
    check_count(max_out_n_q)
    float_dtype = _code(dtype)
    user_config = _user_config(config)  # a refused key stops here, before the checkpoint is opened
    try:
        tensors, _ = read_tensor_infos(src)
    except WeightsError as e:
        raise ConvertError(str(e)) from None
    plan = _plan(src, tensors, (user_config or {}).get("depformer_weights_per_step_schedule"))
    adapter = None if lora is None else _adapter(src, lora, plan.layout, user_config, tensors)
    user_config = trimmed_config(config_without_lora(user_config, lora is not None), max_out_n_q, plan.dims.dep_q)
    plan = keep_steps(plan, max_out_n_q)
    cfg, cfg_json, notes = build_config(plan.dims, user_config)
    specs = output_specs(plan.pieces, bits, float_dtype)
    _check_against_model(cfg, specs, bits, float_dtype)

    out_name = MOSHI_NAMES[bits]
    out_path = out_dir / out_name
    out_real, cfg_real = _outputs(src, config, out_dir, out_path, lora)
    kind = dtype if bits is None else f"{bits}-bit (group size {GROUP_SIZE_FOR_BITS[bits]})"
    say(f"converting {src} ({plan.layout} layout, {len(tensors)} tensors) -> {out_path} [{kind}]")
    if notes:
        say("not recorded in the weights, assumed (set with --config): " + "; ".join(notes))
    if adapter is not None:
        say(f"merging LoRA {adapter.path} (rank {adapter.rank}, scaling {adapter.scaling:g}) into "
            f"{len(adapter.targets)} weights")
    if max_out_n_q is not None:
        say(f"keeping the first {max_out_n_q} depformer steps")
    with atomic_output(out_real) as partial:  # the file appears only once complete
        _write_weights(partial, src, tensors, plan.pieces, specs, bits, float_dtype, progress, adapter)
    cfg_json = {"moshi_name": out_name, **{k: v for k, v in cfg_json.items() if k != "moshi_name"}}
    if bits is not None:  # written down, as mlx-lm does, so loading need not infer it from shapes
        cfg_json["quantization"] = Quantization(bits, GROUP_SIZE_FOR_BITS[bits]).to_dict()
    with atomic_output(cfg_real) as tmp:
        tmp.write_text(json.dumps(cfg_json, indent=2) + "\n", encoding="utf-8")
    say(f"wrote {out_path} ({_size(out_real.stat().st_size)}, {len(specs)} tensors) and {out_dir / 'config.json'}")
    return out_path


def _adapter(src: Path, lora: str | os.PathLike, layout: str, user_config: dict | None, tensors: dict) -> LoraAdapter:
    """The checked LoRA adapter; its names are PyTorch's, so the input must be in that layout."""
    if layout != "pytorch":
        raise ConvertError(f"--lora needs the PyTorch checkpoint the adapter was trained on; {src} is in the MLX layout")
    return read_adapter(lora, user_config or {}, tensors)


def _write_weights(
    partial: Path, src: Path, tensors: dict, pieces: list[Piece], specs: Specs,
    bits: int | None, float_dtype: str, progress: Callable[[int, int], None] | None,
    adapter: LoraAdapter | None = None,
) -> None:
    """Stream the converted tensors into ``partial``, one source tensor at a time."""
    import mlx.core as mx

    # Data order: source by source, so each source tensor is read exactly once.
    groups: OrderedDict[str, list[Piece]] = OrderedDict()
    for p in pieces:
        groups.setdefault(p.source, []).append(p)
    order = [n for ps in groups.values() for p in ps for n, _, _ in quantized_parts(p.name, p.shape, bits, float_dtype)]
    writer = _Writer(partial, specs, order)
    done = writer.header_bytes
    report = progress or (lambda done, total: None)
    report(done, writer.total)
    try:
        source_arrays = mx.load(str(src))  # lazy: each tensor is read from the file when first evaluated
        factors = {} if adapter is None else mx.load(str(adapter.path))
        cast = mx.float32 if float_dtype == "F32" else mx.bfloat16
        for source, group in groups.items():
            x = source_arrays.pop(source)  # popped so each tensor's data is freed once converted
            if adapter is not None:
                x = adapter.merged(source, x, factors)
            x = x.astype(cast)
            for p in group:
                for name, data in _stored(x, tensors[source].shape, p, bits, float_dtype):
                    done += writer.write(name, data)
                    report(done, writer.total)
            del x
        writer.close()
        if partial.stat().st_size != writer.total:
            raise RuntimeError(f"wrote {partial.stat().st_size} bytes, expected {writer.total}")
    finally:
        writer.close()


def _stored(x: Any, shape: tuple[int, ...], p: Piece, bits: int | None, float_dtype: str):
    """(name, bytes) of the tensors one piece is stored as: its rows of `x`, reshaped, quantized if asked."""
    import mlx.core as mx
    import numpy as np

    y = x
    if p.chunk is not None:
        i, n = p.chunk
        rows = shape[0] // n
        y = y[i * rows : (i + 1) * rows]
    y = y.reshape(p.shape)
    parts = [y] if bits is None or len(p.shape) != 2 or not quantizes(p.name) else list(
        mx.quantize(y, group_size=GROUP_SIZE_FOR_BITS[bits], bits=bits)
    )
    mx.eval(parts)
    for (name, _, _), t in zip(quantized_parts(p.name, p.shape, bits, float_dtype), parts):
        arr = np.ascontiguousarray(np.asarray(t.view(mx.uint16) if t.dtype == mx.bfloat16 else t))
        yield name, memoryview(arr).cast("B")  # numpy has no bfloat16: its bits go out as uint16
