"""Strict loading of Moshi LM checkpoints in the published MLX layout (bf16, q8, q4).

The safetensors header is read and checked against the model before any tensor data is
touched, so a wrong, truncated or mismatched file gives one clear line instead of an error
from deep inside MLX. Tensor data is then read lazily and materialised layer by layer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .models.config import LmConfig, config_v0_1
from .models.lm import Lm


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line meant for the user."""


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code: BF16, F32, U32, ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    tensors: dict[str, TensorInfo]
    quantization: Quantization | None

    @property
    def label(self) -> str:
        return f"q{self.quantization.bits}" if self.quantization else "bf16/float"


# Published group sizes: what `nn.quantize` used for kyutai/moshi*-mlx-q8 and -q4.
GROUP_SIZE_FOR_BITS = {8: 64, 4: 32}
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class SafetensorsHeader:
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype": "BF16", "shape": [...], "data_offsets": [a, b]}
    metadata: dict[str, str] | None
    data_start: int  # absolute file offset of the first data byte
    file_size: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.tensors.items()}


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check a safetensors header; raises ValueError with a short reason.

    Checks that every tensor's byte range matches its shape and dtype and lies inside the file, so a
    truncated (partially downloaded) file is caught here rather than as a crash while loading.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError("file is empty")
    if size < 8:
        raise ValueError(f"not a safetensors file (only {size} bytes)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n < 2 or n > _MAX_HEADER or n > size - 8:
            raise ValueError("not a safetensors file (bad header length)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"not a safetensors file (bad entry for {name!r})") from None
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"tensor {name} has unknown dtype {dtype}")
        if end - start != math.prod(shape) * _DTYPE_BYTES[dtype] or start < 0:
            raise ValueError(f"tensor {name}: byte range does not match shape {shape} {dtype}")
        if end > data_len:
            raise ValueError(
                f"file is truncated ({size} bytes; tensor {name} needs {8 + n + end}): incomplete download or copy?"
            )
    return SafetensorsHeader(tensors=header, metadata=metadata, data_start=8 + n, file_size=size)


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The checked header of an LM checkpoint, or a WeightsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        header = read_safetensors_header(path)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror}") from None
    return {name: TensorInfo(info["dtype"], tuple(info["shape"])) for name, info in header.tensors.items()}


def detect_quantization(tensors: dict[str, TensorInfo], config: LmConfig) -> Quantization | None:
    """Read bits and group size off the text head: packed uint32 weight + per-group scales."""
    weight = tensors.get("text_linear.weight")
    if weight is None:
        raise WeightsError("not a Moshi LM checkpoint: it has no 'text_linear.weight'")
    if weight.dtype != "U32":
        return None
    scales = tensors.get("text_linear.scales")
    if scales is None or len(weight.shape) != 2 or len(scales.shape) != 2:
        raise WeightsError("quantized checkpoint lacks 'text_linear.scales'")
    dim = config.transformer.d_model
    bits, rem = divmod(weight.shape[1] * 32, dim)
    group_size = dim // scales.shape[1] if scales.shape[1] else 0
    if rem or bits not in (2, 3, 4, 5, 6, 8) or group_size * scales.shape[1] != dim:
        raise WeightsError(
            f"quantized text head {list(weight.shape)} does not fit model dim {dim}: wrong --lm-config for these weights?"
        )
    return Quantization(bits, group_size)


def inspect_checkpoint(path: str | os.PathLike, config: LmConfig | None = None) -> CheckpointInfo:
    config = config or config_v0_1()
    tensors = read_header(path)
    return CheckpointInfo(Path(path), tensors, detect_quantization(tensors, config))


def build_model(config: LmConfig, quantization: Quantization | None = None, dtype: mx.Dtype = mx.bfloat16) -> Lm:
    """A model whose parameters are lazy (nothing allocated until evaluated or loaded)."""
    model = Lm(config)
    model.set_dtype(dtype)
    if quantization is not None:
        # Every Linear and Embedding, as in the published q8/q4 files; norms stay in `dtype`.
        nn.quantize(model, group_size=quantization.group_size, bits=quantization.bits)
        for _, module in model.named_modules():
            if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                # Scales and biases stay bfloat16 as published, whatever the compute dtype.
                module.scales = module.scales.astype(mx.bfloat16)
                module.biases = module.biases.astype(mx.bfloat16)
    return model


def expected_layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    return {name: (tuple(a.shape), a.dtype) for name, a in tree_flatten(model.parameters())}


def _summarise(names: Iterable[str], limit: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_layout(tensors: dict[str, TensorInfo], model: nn.Module, path: str | os.PathLike) -> None:
    expected = expected_layout(model)
    missing = expected.keys() - tensors.keys()
    unexpected = tensors.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_summarise(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_summarise(unexpected)})")
        raise WeightsError(f"{path} does not match the model config: " + "; ".join(parts))
    for name, (shape, dtype) in expected.items():
        info = tensors[name]
        if info.shape != shape:
            raise WeightsError(f"{path}: {name} has shape {list(info.shape)}, the model expects {list(shape)}")
        if (dtype == mx.uint32) != (info.dtype == "U32") or info.dtype not in ("BF16", "F16", "F32", "U32"):
            raise WeightsError(f"{path}: {name} is {info.dtype}, the model expects {dtype}")


_FLOAT_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}


def checkpoint_dtype(tensors: dict[str, TensorInfo]) -> mx.Dtype:
    """The precision an unquantized checkpoint is stored in (read off its output norm)."""
    info = tensors.get("out_norm.weight") or tensors.get("text_linear.weight")
    return _FLOAT_DTYPES.get(info.dtype, mx.bfloat16) if info is not None else mx.bfloat16


def default_dtype(quantization: Quantization | None, tensors: dict[str, TensorInfo] | None = None) -> mx.Dtype:
    """Compute dtype: an unquantized checkpoint's own precision (never changed silently; bfloat16 as
    published), and for quantized models bfloat16, except on the CPU device.

    MLX's CPU quantized matmul is ~8x slower when activations *and* scales are bfloat16 than
    when either is float32 (measured: 351 vs 45 ms for a 12288x4096 q4 matrix). So on CPU a
    quantized model computes in float32 while its packed weights and bfloat16 scales stay as
    published. Metal keeps bfloat16 throughout.
    """
    if quantization is None:
        return checkpoint_dtype(tensors) if tensors is not None else mx.bfloat16
    if mx.default_device() == mx.cpu:
        return mx.float32
    return mx.bfloat16


def load_lm(
    path: str | os.PathLike,
    config: LmConfig | None = None,
    dtype: mx.Dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Lm:
    """Load a Moshi LM checkpoint strictly.

    `dtype` is the compute dtype for unquantized tensors (default: the checkpoint's own, so an f32
    file loads as f32) and for quantized models' activations (default: `default_dtype()`).
    `progress(done, total)` is called while tensors are materialised.
    """
    config = config or config_v0_1()
    info = inspect_checkpoint(path, config)
    model = build_model(config, info.quantization, dtype or default_dtype(info.quantization, info.tensors))
    check_layout(info.tensors, model, path)
    expected = expected_layout(model)
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    items = []
    for name, array in weights.items():
        want = expected[name][1]
        items.append((name, array if array.dtype == want else array.astype(want)))
    model.update(tree_unflatten(items))
    _materialise(model, progress)
    return model


def _materialise(model: Lm, progress: Callable[[int, int], None] | None) -> None:
    """Evaluate parameters in layer-sized chunks so peak memory stays near the model size."""
    groups: list[list[mx.array]] = []
    for name, child in model.children().items():
        if name == "transformer":
            groups.extend([[a for _, a in tree_flatten(layer.parameters())] for layer in child.layers])
        elif name == "depformer":
            groups.extend([[a for _, a in tree_flatten(s.parameters())] for s in child.slices])
        else:
            groups.append([a for _, a in tree_flatten(child.parameters() if isinstance(child, nn.Module) else child)])
    total = len(groups)
    for i, group in enumerate(groups):
        try:
            mx.eval(group)
        except (RuntimeError, ValueError) as e:
            raise WeightsError(f"failed reading tensor data: {str(e).splitlines()[0]}") from None
        if progress is not None:
            progress(i + 1, total)


def save_lm(model: Lm, path: str | os.PathLike) -> None:
    """Write a model's parameters in the published layout (same names, shapes and dtypes)."""
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
