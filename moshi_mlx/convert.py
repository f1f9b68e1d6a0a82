"""Convert a PyTorch Moshi checkpoint into the MLX layout, optionally quantized.

    python -m moshi_mlx.convert IN.safetensors OUT_DIR [-q 4|8] [--config config.json]
        [--lora ADAPTER.safetensors] [--max-out-n-q N]
    python -m moshi_mlx.convert --voices voices.tgz [--out DIR]     (PersonaPlex voice presets, needs torch)

IN is laid out like `model.safetensors` of kyutai/moshiko-pytorch-bf16 (attention weights either as
`in_projs.{i}` / `out_projs.{i}` or as the older stacked `in_proj_weight` / `out_proj.weight`). An MLX bf16
checkpoint is accepted too, which only re-quantizes it. OUT_DIR receives `model.safetensors`,
`model.q8.safetensors` or `model.q4.safetensors` (same names, shapes and dtypes as the published MLX files)
and a `config.json` with the Kyutai LM config keys. Fine-tunes: `--lora` merges a LoRA adapter of Kyutai's
moshi fine-tuning into the weights (`lora_rank` / `lora_scaling` from --config; `moshi_mlx.model_files.lora`),
`--max-out-n-q N` keeps the first N depformer steps (`moshi_mlx.model_files.depformer_steps`).

This is the command: its flags and the shell. The name mapping is `moshi_mlx.models.pytorch`, the streaming
conversion `moshi_mlx.model_files.convert`.
"""

from __future__ import annotations

import argparse
import sys

from . import cli
from .errors import UsageError
from .model_files.convert import OUTPUT_DTYPES, convert
from .model_files.hub import MOSHI_NAMES
from .model_files.lora import DEFAULT_SCALING

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m moshi_mlx.convert",
        description="Convert a PyTorch Moshi checkpoint (e.g. model.safetensors of kyutai/moshiko-pytorch-bf16) "
        "to the MLX layout, optionally quantized like the published kyutai/moshiko-mlx-q4/-q8 files.",
    )
    ap.add_argument("input", nargs="?", help="PyTorch Moshi .safetensors (or an MLX bf16 one to quantize)")
    ap.add_argument("out_dir", nargs="?", help="directory for model[.q4|.q8].safetensors and config.json")
    ap.add_argument(
        "--voices", default=None, metavar="ARCHIVE",
        help="instead: convert NVIDIA's PersonaPlex voice presets (voices.tgz, a folder of .pt or one .pt) to "
        "NAME.safetensors (needs torch: pip install 'moshi_mlx[voices]')",
    )
    ap.add_argument("--out", default=None, metavar="DIR", help="with --voices: where to write (default: ./voices "
                    "beside the archive)")
    ap.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None, help="quantize to 4 or 8 bits")
    ap.add_argument(
        "--config", default=None, metavar="JSON",
        help="Kyutai LM config.json for what the weights do not record (num_heads, context, delays, ...)",
    )
    ap.add_argument(
        "--dtype", choices=sorted(OUTPUT_DTYPES), default="bf16",
        help="precision of the unquantized output (default bf16, as published)",
    )
    ap.add_argument(
        "--lora", default=None, metavar="ADAPTER",
        help=f"LoRA adapter .safetensors to merge into the weights "
        f"(scaling: --config's lora_scaling, else Kyutai's default {DEFAULT_SCALING:g})",
    )
    ap.add_argument(
        "--max-out-n-q", type=cli.integer(low=1), default=None, metavar="N",
        help="keep only the first N depformer steps (codebooks generated per frame), e.g. 8 of 16",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR (never over an input)")
    cli.add_verbose_arg(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    if args.voices is not None:
        if args.input is not None or args.out_dir is not None:
            raise UsageError("--voices converts voice presets only: give no checkpoint beside it (--out DIR for "
                             "where to write)")
        from .voice_presets import convert_voices

        convert_voices(args.voices, args.out, log=cli.say)
        return 0
    if args.input is None or args.out_dir is None:
        raise UsageError("give IN.safetensors and OUT_DIR (or --voices ARCHIVE)")
    if args.out is not None:
        raise UsageError("--out goes with --voices; a checkpoint's output folder is OUT_DIR")
    bar = cli.Progress(not args.no_progress)
    progress = bar.callback(MOSHI_NAMES[args.quantize], unit="B", unit_scale=True, unit_divisor=1024)
    convert(
        args.input, args.out_dir, bits=args.quantize, config=args.config, progress=progress,
        force=args.force, dtype=args.dtype, log=cli.say, lora=args.lora, max_out_n_q=args.max_out_n_q,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
