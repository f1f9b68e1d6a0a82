"""The model the benchmark times, always loaded through the app's own front door, `assets.load()`.

Random weights (``--config tiny|small|7b``) are built in the published layout (bfloat16, or
q8/q4 with bfloat16 scales, like kyutai/moshiko-mlx-*), written to a temporary safetensors file
with its config.json, and then loaded like any local checkpoint, so they take the app's path.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..audio.codec_choice import CodecChoice
from ..model_files.assets import Assets, load
from ..model_files.budget import weights_bytes
from ..model_files.checkpoint import SHORT_DTYPES, resolve_model
from ..model_files.source import ModelSource
from ..model_files.stand_ins import (
    HIBIKI_CONFIGS,
    demo_assets,
    tiny_hibiki_config,
    write_random_lm,
    write_stand_in_tokenizer,
)
from ..models.config import PRESETS, LmConfig, config_v0_1, preset
from ..models.lm import Lm
from .measure import gb

# Precision names used by benchmarks/compare_reference.py (the reference's spelling) -> (quantize, dtype).
PRECISIONS: dict[str, tuple[int | None, str | None]] = {
    **{short: (None, SHORT_DTYPES[short]) for short in ("f32", "bf16")},
    "q8": (8, None),
    "q4": (4, None),
}


@dataclass(frozen=True)
class ModelInfo:
    label: str  # how the verdict names it: "-q 4", "small -q 4 (random weights)", ...
    source: str  # "file", "random" or "demo"
    config: str  # tiny / small / 7b, or "from config.json"
    bits: int | None  # weight quantization, None for float weights
    group_size: int | None
    compute_dtype: str
    params: int  # logical parameter count (before packing)
    weights_gb: float  # bytes the loaded parameters take
    path: str | None = None
    repo: str | None = None


@dataclass(frozen=True)
class LoadTimes:
    load_s: float  # assets.load(): resolve files, load the LM, Mimi and tokenizer
    mlx_peak_gb: float  # MLX allocator peak while loading
    write_random_s: float | None = None  # building + writing random weights (not part of loading)
    file_gb: float | None = None


@dataclass
class Loaded:
    assets: Assets
    info: ModelInfo
    load: LoadTimes


#: Hibiki's published configs (conditioned: the benchmark also times guidance), and one shrunk to test size.
HIBIKI_BENCH_CONFIGS = {**{f"hibiki-{size}": HIBIKI_CONFIGS[size] for size in HIBIKI_CONFIGS},
                        "hibiki-tiny": tiny_hibiki_config()}
#: Every --config name: the presets, then Hibiki's.
RANDOM_CONFIGS = (*PRESETS, *HIBIKI_BENCH_CONFIGS)


def random_config(name: str, context: int | None) -> LmConfig:
    config = LmConfig.from_dict(HIBIKI_BENCH_CONFIGS[name]) if name in HIBIKI_BENCH_CONFIGS else preset(name)
    if context is not None:
        config = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, context=context))
    return config


def load_model(args: Any, scratch: Path, log: Callable[[str], None], progress: Callable[[int, int], None] | None) -> Loaded:
    """Load what the command line asks for: demo, random weights in a named config, or model files."""
    source = ModelSource.from_args(args)
    write_s = file_gb = None
    if args.demo:
        kind, config_name = "demo", "tiny"
    elif args.config is not None:
        kind, config_name = "random", args.config
        t0 = time.perf_counter()
        weights, config_path = write_random_lm(
            random_config(args.config, args.context), args.quantize, scratch, args.seed, progress
        )
        write_s = round(time.perf_counter() - t0, 3)
        file_gb = gb(weights.stat().st_size)
        stand_ins = demo_assets()
        tokenizer = stand_ins.tokenizer_path
        vocab = random_config(args.config, args.context).text_out_vocab_size
        if vocab != 32000:  # the demo's tokenizer has Moshi's 32000 pieces; Hibiki's vocabulary is its own
            tokenizer = write_stand_in_tokenizer(scratch / "tokenizer.model", vocab)
        source = dataclasses.replace(
            source,
            moshi_weights=str(weights),
            lm_config=str(config_path),
            mimi_weights=args.mimi_weights or str(stand_ins.mimi_path),
            tokenizer=args.tokenizer or str(tokenizer),
        )
    else:
        kind, config_name = "file", None
    # The files found first (a download is not load time), with the hub's bars only if progress is shown.
    resolved = None if args.demo else resolve_model(source, progress=bool(getattr(args, "progress", True)))
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    codec = CodecChoice.from_args(args)
    assets = load(source, demo=args.demo, dtype=args.dtype, log=log, resolved=resolved, codec=codec)
    assets.plan_memory(args.max_memory, args.kv_bits, log)  # as the app does: --max-memory, --kv-bits
    times = LoadTimes(round(time.perf_counter() - t0, 3), gb(mx.get_peak_memory()), write_s, file_gb)
    info = describe(assets.lm, kind, config_name)
    if kind == "file":
        path = Path(args.moshi_weights) if args.moshi_weights else None
        info = dataclasses.replace(info, path=str(path) if path else None, repo=None if path else assets.description)
    return Loaded(assets, info, times)


def _quantization(lm: Lm) -> tuple[int | None, int | None]:
    head = lm.text_linear
    if isinstance(head, nn.QuantizedLinear):
        return head.bits, head.group_size
    return None, None


def param_count(config: LmConfig) -> int:
    """Logical parameter count of a config; a lazy model, so nothing is allocated."""
    return int(sum(p.size for _, p in tree_flatten(Lm(config).parameters())))


def describe(lm: Lm, kind: str, config_name: str | None) -> ModelInfo:
    config = lm.config
    bits, group = _quantization(lm)
    dtype = str(lm.dtype).rsplit(".", 1)[-1]
    precision = f"-q {bits}" if bits else ("bf16" if dtype == "bfloat16" else dtype)
    if kind == "demo":
        label = "--demo (tiny random weights)"
    elif kind == "random":
        label = f"{config_name} {precision} (random weights)"
    else:
        label = precision
    if config_name is None:
        config_name = "7b" if config == config_v0_1() else "from config.json"
    return ModelInfo(
        label=label,
        source=kind,
        config=config_name,
        bits=bits,
        group_size=group,
        compute_dtype=dtype,
        params=param_count(config),
        weights_gb=gb(weights_bytes(lm)),
    )


def scratch_dir() -> tempfile.TemporaryDirectory:
    """Where random weights are written; removed when the run ends."""
    return tempfile.TemporaryDirectory(prefix="moshi-mlx-bench-")
