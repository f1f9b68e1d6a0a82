"""A LoRA adapter of Kyutai's moshi fine-tuning, merged into the base weights while converting (`convert --lora`).

Kyutai's PyTorch moshi wraps every `nn.Linear` of the LM in a LoRA layer when config.json says `"lora": true`;
an adapter file holds, for each wrapped linear `NAME` (its base weight `NAME.weight`, [out, in]),
`NAME.lora_A.weight` [rank, in] and `NAME.lora_B.weight` [out, rank], and the merged weight is
`W + lora_scaling * B @ A` (config keys `lora_rank`, default 128, and `lora_scaling`, default 2.0; `lora_name`
names the adapter file in a model repository). The names are the PyTorch ones, so only a PyTorch-layout
checkpoint can take an adapter. Merging happens in float32, before the output's dtype or quantization.

Everything is checked from the two headers before any tensor data is read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.pytorch import ConvertError
from .checkpoint import SAFETENSORS_DTYPES, TensorInfo, WeightsError, read_tensor_infos

__all__ = ["CONFIG_KEYS", "DEFAULT_SCALING", "LoraAdapter", "config_without_lora", "read_adapter"]

#: Kyutai's config.json keys about LoRA; a merged output needs none of them.
CONFIG_KEYS = ("lora", "lora_rank", "lora_scaling", "lora_name")
#: Kyutai's defaults (moshi.models.loaders.get_moshi_lm) when config.json leaves them out.
DEFAULT_SCALING = 2.0
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraAdapter:
    """A checked adapter: which base tensors it changes and by how much."""

    path: Path
    rank: int
    scaling: float
    targets: tuple[str, ...]  # base tensor names (NAME.weight), each with NAME.lora_A/B.weight in the file

    def merged(self, name: str, weight: Any, arrays: dict[str, Any]) -> Any:
        """`weight` (an mx.array) with this adapter's update if `name` is a target, in float32.

        `arrays` is the adapter file loaded lazily (mx.load); a target's two factors are read from it here.
        """
        import mlx.core as mx

        if name not in self.targets:
            return weight
        base = name.removesuffix(".weight")
        down = arrays[base + _DOWN].astype(mx.float32)
        up = arrays[base + _UP].astype(mx.float32)
        return weight.astype(mx.float32) + self.scaling * (up @ down)


def _scaling(config: dict) -> float:
    value = config.get("lora_scaling", DEFAULT_SCALING)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConvertError(f"--config has lora_scaling={value!r}; expected a finite number")
    return float(value)


def _pairs(path: Path, tensors: dict[str, TensorInfo]) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """{base tensor name: (A, B)}: every tensor must be one factor of a complete pair."""
    bases: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        suffix = next((s for s in (_DOWN, _UP) if name.endswith(s)), None)
        if suffix is None:
            raise ConvertError(f"{path}: tensor {name} is not a LoRA factor (NAME.lora_A.weight / NAME.lora_B.weight)")
        if info.dtype not in SAFETENSORS_DTYPES or len(info.shape) != 2:
            raise ConvertError(f"{path}: tensor {name} is {info.dtype} {list(info.shape)}; expected a 2-D float matrix")
        bases.setdefault(name.removesuffix(suffix), {})[suffix] = info
    if not bases:
        raise ConvertError(f"{path}: holds no tensor: not a LoRA adapter")
    for base, factors in bases.items():
        for suffix in (_DOWN, _UP):
            if suffix not in factors:
                raise ConvertError(f"{path}: {base}{suffix} is missing (each LoRA layer needs lora_A and lora_B)")
    return {base + ".weight": (f[_DOWN], f[_UP]) for base, f in bases.items()}


def read_adapter(path: str | os.PathLike, config: dict, base: dict[str, TensorInfo]) -> LoraAdapter:
    """Check the adapter at `path` against the base checkpoint's tensors (`base`) and the LoRA keys of `config`."""
    path = Path(path)
    if config.get("lora") is False:
        raise ConvertError("--config says lora: false, but --lora gives an adapter")
    try:
        tensors, _ = read_tensor_infos(path, origin=f"--lora {path}")
    except WeightsError as e:
        raise ConvertError(str(e)) from None
    pairs = _pairs(path, tensors)
    ranks = {down.shape[0] for down, _ in pairs.values()}
    if len(ranks) != 1:
        raise ConvertError(f"{path}: LoRA factors of ranks {sorted(ranks)}; Kyutai's adapters have one rank")
    rank = ranks.pop()
    want = config.get("lora_rank")
    if want is not None and want != rank:
        raise ConvertError(f"--config has lora_rank={want!r} but the adapter's factors have rank {rank}")
    for name, (down, up) in sorted(pairs.items()):
        if name not in base:
            raise ConvertError(f"{path}: adapts {name}, which the checkpoint does not have (a PyTorch-layout one?)")
        shape = base[name].shape
        if up.shape[1] != rank or (up.shape[0], down.shape[1]) != tuple(shape):
            raise ConvertError(
                f"{path}: {name} is {list(shape)} but its LoRA factors are {list(down.shape)} and {list(up.shape)}"
            )
    return LoraAdapter(path, rank, _scaling(config), tuple(sorted(pairs)))


def config_without_lora(config: dict | None, adapter_given: bool) -> dict | None:
    """The user's config less Kyutai's LoRA keys; `"lora": true` needs the adapter given with --lora."""
    if config is None:
        return None
    if config.get("lora") is True and not adapter_given:
        named = f" (its lora_name: {config['lora_name']})" if config.get("lora_name") else ""
        raise ConvertError(f"--config says lora: true: give the adapter file with --lora{named}")
    return {k: v for k, v in config.items() if k not in CONFIG_KEYS}
