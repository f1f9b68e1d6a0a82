"""One shared `load()`: the LM, Mimi and the text tokenizer, from the hub, local files or the demo stand-ins."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .budget import GB, MemoryPlan, apply_limits, machine_budget_bytes, plan_memory, weights_bytes
from .engine import ConversationEngine, EngineSettings
from .loading import WeightsError, build_model, load_lm
from .models.cache import DEFAULT_KV_BITS, KV_BITS
from .models.config import LmConfig, config_tiny, config_v0_1
from .models.lm import Lm
from .sampling import DEFAULT_AUDIO_SAMPLING, DEFAULT_TEXT_SAMPLING, SamplingParams
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
        (log or _stderr)(plan.describe())
        self.memory = plan
        return plan


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
    quantize: int | None = None,
    hf_repo: str | None = None,
    revision: str | None = None,
    moshi_weights: str | None = None,
    mimi_weights: str | None = None,
    tokenizer: str | None = None,
    lm_config: str | None = None,
    demo: bool = False,
    dtype: str | None = None,
    log: Callable[[str], None] = _stderr,
) -> Assets:
    """Load everything a conversation needs. Errors are one-line exceptions (WeightsError, HubError, ...)."""
    from .mimi import Mimi  # rustymimi is only needed once we really load

    start = time.perf_counter()
    if demo:
        from .demo import demo_assets

        log(DEMO_BANNER)
        files = demo_assets()
        lm = demo_lm()
        mimi = Mimi(files.mimi_path)
        tok = TextTokenizer(files.tokenizer_path)
        return Assets(lm, mimi, tok, "demo (tiny random LM, random Mimi)", True, time.perf_counter() - start)

    from .hub import resolve_model_files

    files = resolve_model_files(
        quantize=quantize,
        hf_repo=hf_repo,
        revision=revision,
        moshi_weights=moshi_weights,
        mimi_weights=mimi_weights,
        tokenizer=tokenizer,
        lm_config=lm_config,
    )
    config = LmConfig.from_dict(files.lm_config) if files.lm_config else config_v0_1()
    log(f"loading Moshi weights from {files.moshi}")
    lm = load_lm(files.moshi, config, DTYPES[dtype] if dtype else None, _progress_printer("Moshi", log))
    mimi = Mimi(files.mimi)
    tok = TextTokenizer(files.tokenizer)
    if tok.vocab_size < config.text_out_vocab_size:
        raise WeightsError(
            f"text tokenizer {files.tokenizer} has {tok.vocab_size} pieces but the model emits {config.text_out_vocab_size}"
        )
    label = files.repo or str(Path(files.moshi).parent)
    return Assets(lm, mimi, tok, label, False, time.perf_counter() - start)


# -- shared command-line flags ------------------------------------------------------------
def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Model, sampling and demo flags shared by every entry point."""
    from .hub import add_model_args

    add_model_args(parser)
    parser.add_argument("--demo", action="store_true", help="tiny random model + random Mimi: no download (babble)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype for unquantized weights")
    group = parser.add_argument_group("sampling")
    group.add_argument("--text-temperature", type=float, default=DEFAULT_TEXT_SAMPLING.temperature)
    group.add_argument("--text-topk", type=int, default=DEFAULT_TEXT_SAMPLING.top_k)
    group.add_argument("--audio-temperature", type=float, default=DEFAULT_AUDIO_SAMPLING.temperature)
    group.add_argument("--audio-topk", type=int, default=DEFAULT_AUDIO_SAMPLING.top_k)
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    add_memory_args(parser)


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    """--kv-bits and --max-memory: the LM's key/value precision and the memory budget that picks it."""
    group = parser.add_argument_group("memory")
    group.add_argument(
        "--max-memory", type=_positive_gb, default=None, metavar="GB",
        help="memory for the LM (weights + KV + activations); picks the KV precision and, only if still "
        "needed, a shorter window (default: Metal's recommended working set, else 2/3 of RAM)",
    )
    group.add_argument(
        "--kv-bits", type=int, choices=KV_BITS, default=None,
        help=f"LM key/value cache precision: 16 = model dtype, 8 or 4 = quantized (default {DEFAULT_KV_BITS})",
    )


def _positive_gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 GB, got {text}")
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
        kv_bits=getattr(args, "kv_bits", None),
    )


def load_from_args(args: argparse.Namespace, log: Callable[[str], None] = _stderr) -> Assets:
    """load() from the shared flags, then fit the memory budget (one line says what it chose)."""
    assets = load(
        quantize=getattr(args, "quantize", None),
        hf_repo=getattr(args, "hf_repo", None),
        revision=getattr(args, "revision", None),
        moshi_weights=getattr(args, "moshi_weights", None),
        mimi_weights=getattr(args, "mimi_weights", None),
        tokenizer=getattr(args, "tokenizer", None),
        lm_config=getattr(args, "lm_config", None),
        demo=args.demo,
        dtype=args.dtype,
        log=log,
    )
    assets.plan_memory(getattr(args, "max_memory", None), getattr(args, "kv_bits", None), log)
    return assets
