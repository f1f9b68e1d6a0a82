"""One shared `load()`: the LM, Mimi and the text tokenizer, from the hub, local files or the demo stand-ins."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .engine import ConversationEngine, EngineSettings
from .errors import MoshiError
from .hub import ModelSource
from .loading import WeightsError, build_model, load_lm, resolve_model
from .models.config import LmConfig, config_tiny, config_v0_1
from .models.lm import Lm
from .sampling import DEFAULT_AUDIO_SAMPLING, DEFAULT_TEXT_CONTROLS, DEFAULT_TEXT_SAMPLING, SamplingParams, TextControls
from .tokenizer import TextTokenizer

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
DEMO_BANNER = "DEMO MODE: tiny random-weight model and random Mimi. Moshi will babble noise, not talk."


@dataclass
class Assets:
    lm: Lm
    mimi: object  # moshi_mlx.mimi.Mimi
    tokenizer: TextTokenizer | None
    description: str
    demo: bool
    load_seconds: float
    lm_file: str = ""  # where the LM weights came from (reported to web clients)

    def engine(self, settings: EngineSettings = EngineSettings()) -> ConversationEngine:
        return ConversationEngine(self.lm, self.mimi, self.tokenizer, settings)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress_printer(label: str, log: Callable[[str], None]) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        if log is _stderr and sys.stderr.isatty():
            end = "\n" if done == total else ""
            print(f"\r{label}: {done}/{total} layers", end=end, file=sys.stderr, flush=True)
        elif done == total:
            log(f"{label}: {total}/{total} layers")

    return show


def demo_lm(seed: int = 0, config: LmConfig | None = None) -> Lm:
    """A tiny random-weight LM (nothing downloaded); the same seed gives the same weights."""
    mx.random.seed(seed)
    model = build_model(config or config_tiny(), None, mx.float32)
    mx.eval(model.parameters())
    return model


def load(
    source: ModelSource = ModelSource(),
    demo: bool = False,
    dtype: str | None = None,
    log: Callable[[str], None] = _stderr,
) -> Assets:
    """The one front door: the LM, Mimi and the text tokenizer for `source` (or the demo stand-ins).

    Errors are one-line `MoshiError`s (HubError, WeightsError, ...).
    """
    from .mimi import Mimi  # rustymimi is only needed once we really load

    start = time.perf_counter()
    if demo:
        if source != ModelSource():
            given = [f for f in ("quantize", "hf_repo", "revision") if getattr(source, f) is not None]
            flags = ["-q" if f == "quantize" else "--" + f.replace("_", "-") for f in given] + source.given_files
            raise MoshiError(f"--demo runs built-in stand-ins and cannot use {', '.join(flags)}: drop one or the other")
        from .demo import demo_assets

        log(DEMO_BANNER)
        files = demo_assets()
        lm = demo_lm()
        mimi = Mimi(files.mimi_path)
        tok = TextTokenizer(files.tokenizer_path)
        return Assets(
            lm, mimi, tok, "demo (tiny random LM, random Mimi)", True, time.perf_counter() - start,
            lm_file="none: random demo weights",
        )

    resolved = resolve_model(source)
    files, config = resolved.files, resolved.config
    log(f"loading Moshi weights from {files.moshi}")
    lm = load_lm(resolved.checkpoint, config, DTYPES[dtype] if dtype else None, _progress_printer("Moshi", log))
    mimi = Mimi(files.mimi)
    tok = TextTokenizer(files.tokenizer)
    if tok.vocab_size < config.text_out_vocab_size:
        raise WeightsError(
            f"text tokenizer {files.tokenizer} has {tok.vocab_size} pieces but the model emits {config.text_out_vocab_size}"
        )
    label = files.repo or str(Path(files.moshi).parent)
    return Assets(lm, mimi, tok, label, False, time.perf_counter() - start, lm_file=str(files.moshi))


# -- shared command-line flags ------------------------------------------------------------
def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Model, sampling and demo flags shared by every entry point."""
    from .hub import add_model_args

    add_model_args(parser)
    parser.add_argument("--demo", action="store_true", help="tiny random model + random Mimi: no download (babble)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype for unquantized weights")
    group = parser.add_argument_group("sampling")
    # Validated by the argparse types: a bad value is one error line before anything loads.
    group.add_argument("--text-temperature", type=_number(0.0), default=DEFAULT_TEXT_SAMPLING.temperature)
    group.add_argument("--text-topk", type=_count, default=DEFAULT_TEXT_SAMPLING.top_k)
    group.add_argument("--audio-temperature", type=_number(0.0), default=DEFAULT_AUDIO_SAMPLING.temperature)
    group.add_argument("--audio-topk", type=_count, default=DEFAULT_AUDIO_SAMPLING.top_k)
    group.add_argument(
        "--repetition-penalty", type=_number(0.0, open_low=True), default=DEFAULT_TEXT_CONTROLS.repetition_penalty,
        help="penalise text tokens Moshi used recently (> 1 penalises; default 1.0: off)",
    )
    group.add_argument(
        "--repetition-penalty-context", type=_count, default=DEFAULT_TEXT_CONTROLS.repetition_penalty_context,
        metavar="N", help="how many recent text tokens (not padding) the penalty looks at (default 64)",
    )
    group.add_argument(
        "--pad-mult", type=_number(None), default=DEFAULT_TEXT_CONTROLS.pad_mult,
        help="multiply the text padding probability by exp(PAD_MULT); negative: Moshi talks more (default 0)",
    )
    group.add_argument("--seed", type=_seed, default=None, help="seed for reproducible sampling (both streams)")
    group.add_argument("--text-seed", type=_seed, default=None, help="seed of the text stream (overrides --seed)")
    group.add_argument("--audio-seed", type=_seed, default=None, help="seed of the audio stream (overrides --seed)")


def _number(low: float | None, open_low: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float, at least (or, open_low, above) `low`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value < low or (open_low and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if open_low else '>='} {low:g}, got {text!r}")
        return value

    return parse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    value = _count(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be < 2**63, got {text!r}")
    return value


def add_lag_arg(group: argparse._ActionsContainer) -> None:
    """--max-lag-frames, shared by the real-time front ends (terminal and web)."""
    group.add_argument(
        "--max-lag-frames", type=int, default=2, metavar="N",
        help="80 ms frames allowed to wait for the model; older ones are skipped when it falls behind (default 2)",
    )


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        text=SamplingParams(args.text_temperature, args.text_topk),
        audio=SamplingParams(args.audio_temperature, args.audio_topk),
        seed=args.seed,
        text_controls=TextControls(args.repetition_penalty, args.repetition_penalty_context, args.pad_mult),
        text_seed=args.text_seed,
        audio_seed=args.audio_seed,
    )


def load_from_args(args: argparse.Namespace, log: Callable[[str], None] = _stderr) -> Assets:
    return load(ModelSource.from_args(args), demo=args.demo, dtype=args.dtype, log=log)
