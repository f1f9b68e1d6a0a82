"""Strict loading of Moshi LM checkpoints in the published MLX layout (bf16, q8, q4), and of PyTorch-layout ones
(Kyutai's names: mapped in memory by `pytorch_weights.py`, quantized after loading with -q).

The safetensors header is read and checked against the model before any tensor data is
touched, so a wrong, truncated or mismatched file gives one clear line instead of an error
from deep inside MLX. Tensor data is then read lazily and materialised layer by layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from safetensors import SafetensorError, safe_open

from ..errors import MoshiError, first_line
from ..models.config import LmConfig, config_v0_1
from ..models.lm import Lm, quantize_predicate
from .hub import (
    KNOWN_REPOS,
    TOKENIZER_NAME,
    ModelFiles,
    check_local_path,
    describe_bits,
    find_model_files,
    quantize_hint,
    quantizes_at_load,
    read_local_config,
)
from . import personaplex
from .source import FLAGS, ModelSource


class WeightsError(MoshiError, ValueError):
    """A checkpoint that cannot be loaded; the message is one line meant for the user."""


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int

    def to_dict(self) -> dict[str, int]:
        return {"group_size": self.group_size, "bits": self.bits}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code: BF16, F32, U32, ...
    shape: tuple[int, ...]


# Published group sizes: what `nn.quantize` used for kyutai/moshi*-mlx-q8 and -q4.
GROUP_SIZE_FOR_BITS = {8: 64, 4: 32}

#: The float dtypes, in one table: name (the app's --dtype) -> (short name, MLX dtype, safetensors code).
#: The app's flags take the names, `convert --dtype` and the benchmark's precisions the short names.
FLOAT_DTYPES: dict[str, tuple[str, mx.Dtype, str]] = {
    "bfloat16": ("bf16", mx.bfloat16, "BF16"),
    "float16": ("f16", mx.float16, "F16"),
    "float32": ("f32", mx.float32, "F32"),
}
#: --dtype name -> MLX dtype.
DTYPES: dict[str, mx.Dtype] = {name: dtype for name, (_, dtype, _) in FLOAT_DTYPES.items()}
#: Short name (bf16, f16, f32) -> --dtype name.
SHORT_DTYPES: dict[str, str] = {short: name for name, (short, _, _) in FLOAT_DTYPES.items()}
#: Safetensors code (BF16, F16, F32) -> MLX dtype.
SAFETENSORS_DTYPES: dict[str, mx.Dtype] = {code: dtype for _, dtype, code in FLOAT_DTYPES.values()}


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything known about a checkpoint from its header, read once and passed along."""

    path: Path
    tensors: dict[str, TensorInfo]
    quantization: Quantization | None
    layout: str = "mlx"  # or "pytorch": Kyutai's names, mapped in memory at load time (pytorch_weights.py)

    @property
    def bits(self) -> int | None:
        return self.quantization.bits if self.quantization else None


def read_tensor_infos(path: str | os.PathLike, origin: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Names, dtypes and shapes of a safetensors file, and its metadata, without reading tensor data.

    safetensors checks that the byte ranges tile the file exactly, so a truncated (partially downloaded)
    file is caught here instead of as a crash while loading. Errors are one line, prefixed by `origin`.
    """
    path = Path(path)
    where = origin or str(path)
    if not path.exists():
        raise WeightsError(f"{where}: no such file")
    if path.is_dir():
        raise WeightsError(f"{where}: is a directory, expected a file")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{where}: file is empty")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for name in f.keys():
                piece = f.get_slice(name)
                tensors[name] = TensorInfo(piece.get_dtype(), tuple(piece.get_shape()))
    except SafetensorError as e:
        reason = str(e)
        if "not fully covered" in reason or "incomplete metadata" in reason:
            raise WeightsError(f"{where}: file is truncated ({size} bytes): incomplete download or copy?") from None
        raise WeightsError(f"{where}: not a safetensors file ({reason.split(': ')[-1]})") from None
    except OSError as e:
        raise WeightsError(f"{where}: cannot be read ({e.strerror or first_line(e)})") from None
    return tensors, metadata


def looks_like_mimi(tensors: dict[str, TensorInfo]) -> bool:
    return any(k.startswith("encoder.") for k in tensors) and any(k.startswith("quantizer.") for k in tensors)


def infer_quantization(tensors: dict[str, TensorInfo]) -> Quantization | None:
    """Bits and group size read off the text head, for files that do not say (the published ones).

    The model width comes from `out_norm.weight`, so no config is needed to tell.
    """
    weight, scales, norm = (tensors.get(k) for k in ("text_linear.weight", "text_linear.scales", "out_norm.weight"))
    if weight is None or weight.dtype != "U32":
        return None
    if scales is None or norm is None or len(weight.shape) != 2 or len(scales.shape) != 2:
        raise WeightsError("quantized checkpoint lacks text_linear.scales or out_norm.weight")
    dim = norm.shape[-1]
    bits, rem = divmod(weight.shape[1] * 32, dim)
    group_size = dim // scales.shape[1] if scales.shape[1] else 0
    if rem or bits not in (2, 3, 4, 5, 6, 8) or group_size * scales.shape[1] != dim:
        raise WeightsError(f"quantized text head {list(weight.shape)} does not fit model width {dim}")
    return Quantization(bits, group_size)


def quantization_from_config(config: dict[str, Any] | None) -> Quantization | None:
    """The `quantization` entry we write into config.json (as mlx-lm does), if present."""
    q = (config or {}).get("quantization")
    if not isinstance(q, dict):
        return None
    try:
        return Quantization(int(q["bits"]), int(q["group_size"]))
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"config.json: bad quantization entry {q!r} (expected bits and group_size)") from None


def inspect_checkpoint(
    path: str | os.PathLike, config: dict[str, Any] | None = None, origin: str | None = None
) -> CheckpointInfo:
    """Read an MLX Moshi LM checkpoint's header once and decide its quantization once.

    The quantization written in `config` (config.json) wins; files that carry none (the published
    ones) are read off their shapes. Wrong kinds of file get a one-line error that says what to do.
    """
    where = origin or str(path)
    tensors, _ = read_tensor_infos(path, where)
    if "text_emb.weight" in tensors and "emb.0.weight" in tensors and "audio_embs.0.weight" not in tensors:
        # Kyutai's names, float weights: mapped in memory at load time; the name plan is checked now (no data read)
        from ..models.pytorch import ConvertError, plan_conversion

        try:
            schedule = (config or {}).get("depformer_weights_per_step_schedule")
            plan_conversion({k: v.shape for k, v in tensors.items()}, schedule)
        except ConvertError as e:
            raise WeightsError(f"{where}: a PyTorch-layout checkpoint that cannot be read: {e}") from None
        return CheckpointInfo(Path(path), tensors, None, layout="pytorch")
    if "text_emb.weight" not in tensors or "text_linear.weight" not in tensors:
        hint = " (it looks like Mimi weights: use --mimi-weights)" if looks_like_mimi(tensors) else ""
        raise WeightsError(f"{where}: not a Moshi LM checkpoint (no text_emb/text_linear tensors){hint}")
    try:
        quantization = quantization_from_config(config) or infer_quantization(tensors)
    except WeightsError as e:
        raise WeightsError(f"{where}: {e}") from None
    return CheckpointInfo(Path(path), tensors, quantization)


def quantize_model(model: nn.Module, quantization: Quantization) -> None:
    """Every Linear and Embedding, as in the published q8/q4 files (but the conditioners' tiny tables: see
    `quantize_predicate`); norms stay in the model's dtype.

    Used to build a quantized checkpoint's model and to quantize a bf16 one while it loads.
    """
    nn.quantize(model, group_size=quantization.group_size, bits=quantization.bits, class_predicate=quantize_predicate)
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            # Scales and biases stay bfloat16 as published, whatever the compute dtype.
            module.scales = module.scales.astype(mx.bfloat16)
            module.biases = module.biases.astype(mx.bfloat16)


def build_model(config: LmConfig, quantization: Quantization | None = None, dtype: mx.Dtype = mx.bfloat16) -> Lm:
    """A model whose parameters are lazy (nothing allocated until evaluated or loaded)."""
    model = Lm(config)
    model.set_dtype(dtype)
    if quantization is not None:
        quantize_model(model, quantization)
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


def checkpoint_dtype(tensors: dict[str, TensorInfo]) -> mx.Dtype:
    """The precision an unquantized checkpoint is stored in (read off its output norm)."""
    info = tensors.get("out_norm.weight") or tensors.get("text_linear.weight")
    return SAFETENSORS_DTYPES.get(info.dtype, mx.bfloat16) if info is not None else mx.bfloat16


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


def _load_pytorch(info: CheckpointInfo, config: LmConfig, dtype: mx.Dtype | None, bits: int | None) -> Lm:
    """A PyTorch-layout checkpoint: mapped to our names in memory, checked, then quantized if `bits` is given."""
    from .pytorch_weights import pytorch_weights

    schedule = config.depformer_weights_per_step_schedule
    weights = pytorch_weights(info.path, {k: v.shape for k, v in info.tensors.items()},
                              {k: v.dtype for k, v in info.tensors.items()},
                              list(schedule) if schedule else None, f"{info.path} (PyTorch layout)",
                              steps=config.generated_codebooks)
    quantization = Quantization(bits, GROUP_SIZE_FOR_BITS[bits]) if bits is not None else None
    own = SAFETENSORS_DTYPES.get(info.tensors["text_emb.weight"].dtype, mx.bfloat16)  # the file's precision
    model = build_model(config, None, dtype or (default_dtype(quantization) if quantization else own))
    expected = expected_layout(model)
    check_layout({k: TensorInfo("F32", tuple(v.shape)) for k, v in weights.items()}, model, info.path)
    model.update(tree_unflatten([(k, v.astype(expected[k][1])) for k, v in weights.items()]))
    if quantization is not None:
        quantize_model(model, quantization)
    return model


def load_lm(
    path: str | os.PathLike | CheckpointInfo,
    config: LmConfig | None = None,
    dtype: mx.Dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    quantize: int | None = None,
) -> Lm:
    """Load a Moshi LM checkpoint strictly.

    `path` may be a `CheckpointInfo` already inspected (the header is then not read again).
    `dtype` is the compute dtype for unquantized tensors (default: the checkpoint's own, so an f32
    file loads as f32) and for quantized models' activations (default: `default_dtype()`).
    `progress(done, total)` is called while tensors are materialised. `quantize` (4 or 8) quantizes an
    unquantized checkpoint as it loads (the published group sizes), for repos published in bf16 only.
    """
    config = config or config_v0_1()
    info = path if isinstance(path, CheckpointInfo) else inspect_checkpoint(path)
    if info.layout == "pytorch":  # `quantize` (-q) applies here only: an MLX file carries its own bits
        model = _load_pytorch(info, config, dtype, quantize)
        materialise(model, progress)
        return model
    path = info.path
    if quantize is not None and info.quantization is not None:
        raise WeightsError(f"{path} is already quantized ({info.bits}-bit): drop -q")
    target = Quantization(quantize, GROUP_SIZE_FOR_BITS[quantize]) if quantize is not None else None
    compute = dtype or default_dtype(target or info.quantization, info.tensors)
    model = build_model(config, info.quantization, compute)
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
    if target is not None:
        quantize_model(model, target)
    materialise(model, progress)
    return model


def materialise(model: Lm, progress: Callable[[int, int], None] | None) -> None:
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


# -- one path from model-choosing flags to checked files --------------------------------------------------
@dataclass
class ResolvedModel:
    """The files a conversation needs, each checked for what it holds; the LM header read exactly once."""

    files: ModelFiles
    checkpoint: CheckpointInfo
    config: LmConfig
    quantize_at_load: int | None = None  # -q on a bf16-only repo (Hibiki) or a PyTorch-layout file: at load

    @property
    def quantize(self) -> int | None:
        """The bits the model runs in: the checkpoint's, or those it is quantized to while loading."""
        return self.quantize_at_load or self.checkpoint.bits

    @property
    def repo(self) -> str | None:
        return self.files.repo


def _refuse_bits(quantize: int | None, info: CheckpointInfo, where: str) -> None:
    if info.layout == "pytorch":
        return  # float weights mapped at load time: -q quantizes them then
    if quantize is not None and info.bits != quantize:
        raise WeightsError(
            f"{where} holds {describe_bits(info.bits)} weights but -q {quantize} was given: {quantize_hint(info.bits)}"
        )


def check_mimi_file(path: Path, where: str) -> None:
    tensors, _ = read_tensor_infos(path, where)
    if not looks_like_mimi(tensors):
        hint = " (it looks like Moshi LM weights: use --moshi-weights)" if "text_emb.weight" in tensors else ""
        raise WeightsError(f"{where}: not Mimi codec weights (no encoder./quantizer. tensors){hint}")


def check_tokenizer_file(path: Path, where: str) -> None:
    import sentencepiece

    try:
        ok = sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size() > 0
    except Exception:  # sentencepiece raises bare RuntimeErrors/OSErrors for anything it cannot parse
        ok = False
    if not ok:
        raise WeightsError(f"{where}: not a SentencePiece model (the text tokenizer, e.g. {TOKENIZER_NAME})")


def parse_config(data: dict[str, Any] | None, where: str) -> LmConfig:
    if data is None:
        return config_v0_1()
    try:
        return LmConfig.from_dict(data)
    except Exception as e:  # from_dict raises KeyError/TypeError/ValueError for incomplete configs
        raise WeightsError(f"{where}: not a usable LM config ({first_line(e)})") from None


def _pytorch_layout(tensor_names: set[str]) -> bool:
    """Float weights in Kyutai's PyTorch names: mapped at load, where -q quantizes them (for the hub's choice)."""
    from ..models.pytorch import ConvertError, detect_layout

    try:
        return detect_layout(tensor_names) == "pytorch"
    except ConvertError:
        return False


def resolve_model(source: ModelSource, progress: bool = True) -> ResolvedModel:
    """Find every file (hub.py), then check each for what it holds; local files before any network access."""
    config: LmConfig | None = None
    config_dict: dict[str, Any] | None = None
    if isinstance(source.lm_config, dict):
        config_dict = source.lm_config
        config = parse_config(config_dict, "lm_config")
    elif source.lm_config is not None:
        path = check_local_path("lm_config", source.lm_config)
        config_dict = read_local_config(path)
        config = parse_config(config_dict, f"--lm-config {path}")
    local: CheckpointInfo | None = None
    if source.moshi_weights is not None:
        path = check_local_path("moshi", source.moshi_weights)
        local = inspect_checkpoint(path, config_dict, origin=f"--moshi-weights {path}")
        _refuse_bits(source.quantize, local, f"--moshi-weights {path}")
    checks = {"mimi": (source.mimi_weights, check_mimi_file), "tokenizer": (source.tokenizer, check_tokenizer_file)}
    for kind, (given, check) in checks.items():
        if given is not None:
            path = check_local_path(kind, given)
            check(path, f"{FLAGS[kind]} {path}")

    if config_dict is not None:  # read once: the hub gets the parsed dict, not the path again
        source = replace(source, lm_config=config_dict)
    files = find_model_files(source, local.bits if local else None, progress, takes_q=_pytorch_layout)
    if config is None:
        config = parse_config(files.lm_config, f"{files.repo}/config.json")
    checkpoint = local or inspect_checkpoint(files.moshi, files.lm_config, files.origins["moshi"])
    at_load = None
    if checkpoint.layout == "pytorch" or (local is None and quantizes_at_load(files.repo) and checkpoint.bits is None):
        at_load = source.quantize  # float weights (a bf16-only repo, a PyTorch-layout file): -q quantizes them
    else:
        _refuse_bits(source.quantize, checkpoint, files.origins["moshi"])
    known = KNOWN_REPOS.get(files.repo or "")
    if known is not None and config.model_type != known.model_type and "model_type" not in (files.lm_config or {}):
        config = replace(config, model_type=known.model_type)  # what the repo is, where its config.json is silent
    elif (known is None and checkpoint.layout == "pytorch" and "model_type" not in (files.lm_config or {})
          and personaplex.predicts_both_streams(checkpoint.tensors, config.generated_codebooks, config.audio_codebooks)):
        config = replace(config, model_type=personaplex.MODEL_TYPE)  # local PersonaPlex weights, no config
    for kind, (given, check) in checks.items():
        if given is None:
            check(getattr(files, kind), files.origins[kind])
    return ResolvedModel(files, checkpoint, config, at_load)
