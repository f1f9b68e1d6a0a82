"""One shared `load()`: the LM, Mimi and the text tokenizer, from the hub, local files or the demo stand-ins."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx

from . import cli
from .budget import GB, MemoryPlan, apply_limits, machine_budget_bytes, plan_memory, weights_bytes
from .engine import ConversationEngine, EngineSettings
from .errors import MoshiError
from .hub import ModelSource
from .loading import WeightsError, build_model, load_lm, resolve_model
from .models.cache import DEFAULT_KV_BITS, KV_BITS
from .models.config import LmConfig, config_tiny
from .models.lm import Lm
from .settings import SamplingParams, TextControls
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
    memory: MemoryPlan | None = None  # what the memory budget chose (see moshi_mlx/budget.py)

    def engine(self, settings: EngineSettings = EngineSettings()) -> ConversationEngine:
        plan = self.memory
        if plan is not None and settings.context is None and settings.kv_bits in (None, plan.kv_bits):
            settings = replace(settings, kv_bits=plan.kv_bits, context=plan.context)
        return ConversationEngine(self.lm, self.mimi, self.tokenizer, settings)

    def plan_memory(
        self, max_memory_gb: float | None = None, kv_bits: int | None = None, log: Callable[[str], None] | None = None
    ) -> MemoryPlan:
        """Fit the LM into ``max_memory_gb`` (default: the machine's), set MLX's limits, say what was chosen."""
        t = self.lm.config.transformer
        budget = int(max_memory_gb * GB) if max_memory_gb is not None else machine_budget_bytes()
        plan = plan_memory(
            weights_bytes(self.lm), t.num_layers, t.num_heads, t.head_dim, t.context, budget, kv_bits,
            dtype_bytes=self.lm.dtype.size,
        )
        apply_limits(plan)
        line = plan.describe()
        mimi_bytes = getattr(self.mimi, "resident_bytes", 0)
        if mimi_bytes:  # outside MLX, so outside the budget: said so the whole picture is on one line
            line += f"; Mimi {mimi_bytes / GB:.2f} GB on top ({self.mimi.live_instances} rustymimi instances)"
        (log or cli.say)(line)
        self.memory = plan
        return plan


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
    log: Callable[[str], None] = cli.say,
) -> Assets:
    """The one front door: the LM, Mimi and the text tokenizer for `source` (or the demo stand-ins).

    Errors are one-line `MoshiError`s (HubError, WeightsError, ...).
    """
    from .mimi import Mimi  # rustymimi is only needed once we really load

    start = time.perf_counter()
    if demo:
        if source.given_flags:
            raise MoshiError(
                f"--demo runs built-in stand-ins and cannot use {', '.join(source.given_flags)}: drop one or the other"
            )
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
    lm = load_lm(resolved.checkpoint, config, DTYPES[dtype] if dtype else None, cli.Progress().callback("loading Moshi") if log is cli.say else None)
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
    cli.add_sampling_args(parser)
    cli.add_verbose_arg(parser)
    add_memory_args(parser)


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    """--kv-bits and --max-memory: the LM's key/value precision and the memory budget that picks it."""
    group = parser.add_argument_group("memory")
    group.add_argument(
        "--max-memory", type=cli.number(0.0, open_low=True), default=None, metavar="GB",
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
        "--max-lag-frames", type=cli.integer(1), default=2, metavar="N",
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
        kv_bits=getattr(args, "kv_bits", None),
    )


def load_from_args(args: argparse.Namespace, log: Callable[[str], None] = cli.say) -> Assets:
    """load() from the shared flags, then fit the memory budget (one line says what it chose)."""
    assets = load(ModelSource.from_args(args), demo=args.demo, dtype=args.dtype, log=log)
    assets.plan_memory(getattr(args, "max_memory", None), getattr(args, "kv_bits", None), log)
    return assets
