"""The flag groups every command shares, each defined once: model files, sampling, memory, codec, lag, verbosity.

A bad value is one usage line (exit 2) before anything loads: the argparse types below check bounds.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from ..audio.codec_choice import CODECS, CodecChoice
from ..audio.mlx_mimi import DEFAULT_DEVICE, DEVICES
from ..conditioning import check_conditioning, model_settings
from ..model_files.assets import Assets, load, refuse_demo_flags
from ..model_files.checkpoint import DTYPES, ResolvedModel, resolve_model
from ..model_files.hub import MIMI_NAME, TOKENIZER_NAME
from ..model_files.source import ModelSource
from ..models.cache import DEFAULT_KV_BITS, KV_BITS
from ..models.config import LmConfig
from ..settings import KNOBS, LM_GEN_KNOBS, TEXT_ONLY_KNOBS, TEXT_ONLY_NOTE, EngineSettings, Knob
from .progress import Progress
from .shell import say


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks of unexpected errors")


# -- argparse types: a bad value is one usage line before anything loads -----------------------------
def number(low: float | None = None, high: float | None = None, open_low: bool = False) -> Callable[[str], float]:
    """A finite float, at least (or, with open_low, above) `low` and at most `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value < low or (open_low and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if open_low else '>='} {low:g}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text!r}")
        return value

    return parse


def integer(low: int = 0, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text!r}")
        return value

    return parse


def knob_type(knob: Knob) -> Callable[[str], float | int]:
    """The argparse type of a sampling flag: the knob's own parser, so the message is the server's."""

    def parse(text: str) -> float | int:
        try:
            return knob.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


SEED = knob_type(KNOBS["seed"])
#: Sampling flags' destinations: the same names as the WebSocket query parameters (Kyutai's protocol).
SAMPLING_PARAMS = tuple(KNOBS)


def _knob_help(knob: Knob, server_defaults: bool) -> str:
    if knob.bounds is None or knob.kind == "seed":  # a seed's bounds are just "a 64-bit seed"; left out: random
        return knob.help
    model_says = ", or the model's config.json lm_gen_config" if knob.name in LM_GEN_KNOBS.values() else ""
    where = "" if server_defaults else f"; default {knob.default}{model_says}"
    return f"{knob.help} ({knob.bounds.describe()}{where})"


def add_sampling_args(parser: argparse.ArgumentParser, server_defaults: bool = False) -> None:
    """The sampling flags of every front end (the app's engine, or a remote server with server_defaults).

    Flags left out are None: the engine then takes the model's defaults (its config.json's `lm_gen_config`),
    else the table's; a remote server its own.
    """
    title = "sampling (sent to the server; left out: the server's defaults)" if server_defaults else "sampling"
    g = parser.add_argument_group(title)
    for knob in KNOBS.values():
        g.add_argument(
            knob.flag, type=knob_type(knob), default=None, metavar=knob.kind.upper(),
            help=_knob_help(knob, server_defaults),
        )


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model-file flags shared by every entry point."""
    g = parser.add_argument_group("model files")
    g.add_argument(
        "-q", "--quantize", type=int, choices=[4, 8], default=None,
        help="use 4- or 8-bit weights (default repo kyutai/moshiko-mlx-q4 / -q8); absent: bf16, or whatever "
        "--hf-repo / --moshi-weights holds",
    )
    g.add_argument("--hf-repo", default=None, help="hub repo to take the files from, e.g. kyutai/moshika-mlx-q4")
    g.add_argument("--revision", default=None, help="pin the hub repo to a branch, tag or commit")
    g.add_argument("--moshi-weights", default=None, metavar="PATH", help="local MLX Moshi LM .safetensors")
    g.add_argument("--mimi-weights", default=None, metavar="PATH", help=f"local Mimi .safetensors ({MIMI_NAME})")
    g.add_argument("--tokenizer", default=None, metavar="PATH", help=f"local SentencePiece model ({TOKENIZER_NAME})")
    g.add_argument("--lm-config", default=None, metavar="PATH", help="local config.json describing the LM")
    return parser


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Model, sampling and demo flags shared by every entry point."""
    add_model_args(parser)
    parser.add_argument("--demo", action="store_true", help="tiny random model + random Mimi: no download (babble)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype for unquantized weights")
    add_sampling_args(parser)
    add_verbose_arg(parser)
    add_memory_args(parser)
    add_codec_args(parser)


def add_stt_demo_arg(parser: argparse.ArgumentParser) -> None:
    """--demo-stt (the front ends that run a speech-to-text model live or on a file): the demo's STT stand-in."""
    from ..model_files.assets import STT_DEMO

    parser.add_argument(
        "--demo-stt", dest="demo", action="store_const", const=STT_DEMO,
        help="tiny random speech-to-text model + random Mimi: live captions with no download (made-up words); "
        "`local` with no sound card captions a built-in test signal instead",
    )


def add_codec_args(parser: argparse.ArgumentParser) -> None:
    """--mimi and --mimi-device: which Mimi codec runs, and where (see moshi_mlx.audio.codec_choice)."""
    group = parser.add_argument_group("Mimi codec")
    group.add_argument(
        "--mimi", choices=CODECS, default=None,
        help="the audio codec: rustymimi (Rust, CPU; the default where it installs) or mlx (one weight copy, "
        "flat memory; used by itself where rustymimi cannot be imported)",
    )
    group.add_argument(
        "--mimi-device", choices=DEVICES, default=None,
        help=f"where the MLX Mimi runs (default {DEFAULT_DEVICE}; gpu implies --mimi mlx)",
    )


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    """--kv-bits and --max-memory: the LM's key/value precision and the memory budget that picks it."""
    group = parser.add_argument_group("memory")
    group.add_argument(
        "--max-memory", type=number(0.0, open_low=True), default=None, metavar="GB",
        help="memory for the LM (weights + KV + activations); picks the KV precision and, only if still "
        "needed, a shorter window (default: Metal's recommended working set, else 2/3 of RAM)",
    )
    group.add_argument(
        "--kv-bits", type=int, choices=KV_BITS, default=None,
        help=f"LM key/value cache precision: 16 = model dtype, 8 or 4 = quantized (default {DEFAULT_KV_BITS})",
    )


def add_lag_arg(group: argparse._ActionsContainer) -> None:
    """--max-lag-frames, shared by the real-time front ends (terminal and web)."""
    group.add_argument(
        "--max-lag-frames", type=integer(1), default=2, metavar="N",
        help="80 ms frames allowed to wait for the model; older ones are skipped when it falls behind (default 2)",
    )


def given_knobs(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags the user gave (left out: None, so the model's or the server's defaults stand)."""
    return {name: getattr(args, name) for name in KNOBS if getattr(args, name, None) is not None}


def settings_from_args(
    args: argparse.Namespace, config: LmConfig | None = None, log: Callable[[str], None] = say
) -> EngineSettings:
    """The engine's settings: the table's defaults, then the model's `lm_gen_config`, then the flags given
    (a text-only model: one line names the flags it ignores)."""
    if config is not None and config.text_only:
        note_text_only_flags(args, log)
    return model_settings(config, given_knobs(args), kv_bits=getattr(args, "kv_bits", None))


def note_text_only_flags(args: argparse.Namespace, log: Callable[[str], None] = say) -> None:
    """One line naming the sampling flags given that a text-only (speech-to-text) model ignores, if any."""
    flags = [KNOBS[name].flag for name in given_knobs(args) if name not in TEXT_ONLY_KNOBS]
    if flags:
        log(f"note: {', '.join(flags)} ignored: {TEXT_ONLY_NOTE}")


def resolve_from_args(args: argparse.Namespace) -> ResolvedModel | None:
    """The model flags checked and the files found (downloaded if need be), before any device opens;
    None for --demo (after refusing model flags beside it)."""
    source = ModelSource.from_args(args)
    if args.demo:
        refuse_demo_flags(source)
        return None
    return resolve_model(source)


def load_from_args(
    args: argparse.Namespace, log: Callable[[str], None] = say, resolved: ResolvedModel | None = None
) -> Assets:
    """load() from the shared flags (`resolved`: :func:`resolve_from_args`'s answer), then fit the memory
    budget (one line says what it chose).

    A --condition or --cfg-coef the model cannot take is refused (one line) once its config is read,
    before its weights load.
    """
    progress = Progress().callback("loading Moshi") if log is say else None  # a caller with its own log draws no bar
    knobs = given_knobs(args)

    def check(config: LmConfig) -> None:
        check_conditioning(config, knobs.get("condition"), knobs.get("cfg_coef"))

    assets = load(ModelSource.from_args(args), demo=args.demo, dtype=args.dtype, log=log, progress=progress,
                  resolved=resolved, check=check, codec=CodecChoice.from_args(args))
    assets.plan_memory(getattr(args, "max_memory", None), getattr(args, "kv_bits", None), log)
    return assets
