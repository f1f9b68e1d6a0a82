"""One shared `load()`: the LM, Mimi and the text tokenizer, from the hub, local files or the demo stand-ins."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..audio.codec_choice import CodecChoice
from ..engine import ConversationEngine
from ..errors import UsageError
from ..models.config import LmConfig, config_tiny_stt
from ..models.lm import Lm
from ..settings import EngineSettings
from ..tokenizer import TextTokenizer
from .budget import (
    GB,
    MemoryPlan,
    apply_limits,
    machine_budget_bytes,
    plan_memory,
    weights_bytes,
)
from .checkpoint import DTYPES, ResolvedModel, WeightsError, load_lm, resolve_model
from .source import ModelSource
from .stand_ins import demo_assets, demo_lm
from ..voices import list_voices
from .voice_archive import ready_voices

__all__ = ["DEMO_BANNER", "Assets", "load", "say"]
_log = logging.getLogger("moshi_mlx")
#: The default `log`: status lines through the "moshi_mlx" logger (the CLI shell prints them on stderr).
say = _log.info
DEMO_BANNER = "DEMO MODE: tiny random-weight model and random Mimi. Moshi will babble noise, not talk."
#: `demo=STT_DEMO`: a tiny random speech-to-text model instead (live captions of made-up words).
STT_DEMO = "stt"
STT_DEMO_BANNER = ("DEMO MODE: tiny random-weight speech-to-text model and random Mimi. The captions are made-up "
                   "words, not what you say.")


@dataclass
class Assets:
    lm: Lm
    mimi: object  # a moshi_mlx.audio.mimi.FrameCodec: rustymimi's Mimi or the MLX Mimi
    tokenizer: TextTokenizer | None
    description: str
    demo: bool
    load_seconds: float
    lm_file: str = ""  # where the LM weights came from (reported to web clients)
    memory: MemoryPlan | None = None  # what the memory budget chose (see moshi_mlx/budget.py)
    voices_dir: Path | None = None  # a persona model's voice presets (NAME.safetensors; PersonaPlex's voices.tgz unpacked)

    def engine(self, settings: EngineSettings = EngineSettings()) -> ConversationEngine:
        plan = self.memory
        if plan is not None and settings.context is None and settings.kv_bits in (None, plan.kv_bits):
            settings = replace(settings, kv_bits=plan.kv_bits, context=plan.context)
        return ConversationEngine(self.lm, self.mimi, self.tokenizer, settings, voices_dir=self.voices_dir)

    def plan_memory(
        self, max_memory_gb: float | None = None, kv_bits: int | None = None, log: Callable[[str], None] | None = None
    ) -> MemoryPlan:
        """Fit the LM into ``max_memory_gb`` (default: the machine's), set MLX's limits, say what was chosen."""
        t = self.lm.config.transformer
        budget = int(max_memory_gb * GB) if max_memory_gb is not None else machine_budget_bytes()
        # A conditioned model may run guided (two batch rows: any client may ask for it): room for both rows'
        # keys and values, whose bytes scale with heads x rows.
        rows = 2 if self.lm.config.is_conditioned else 1
        codec_bytes = getattr(self.mimi, "mlx_bytes", 0)  # the MLX Mimi lives inside MLX's allocator
        plan = plan_memory(
            weights_bytes(self.lm), t.num_layers, t.num_kv_heads * rows, t.head_dim, t.context, budget, kv_bits,
            dtype_bytes=self.lm.dtype.size, codec_bytes=codec_bytes,
        )
        apply_limits(plan)
        line = plan.describe()
        outside = getattr(self.mimi, "resident_bytes", 0) - codec_bytes
        if outside > 0:  # rustymimi: outside MLX, so outside the budget: said so the whole picture is on one line
            line += f"; Mimi {outside / GB:.2f} GB on top ({self.mimi.memory_note})"
        (log or say)(line)
        self.memory = plan
        return plan


def refuse_demo_flags(source: ModelSource) -> None:
    """--demo with a model flag is a usage error (the demo would silently ignore it)."""
    if source.given_flags:
        raise UsageError(
            f"--demo runs built-in stand-ins and cannot use {', '.join(source.given_flags)}: drop one or the other"
        )


def load(
    source: ModelSource = ModelSource(),
    demo: bool | str = False,
    dtype: str | None = None,
    log: Callable[[str], None] = say,
    progress: Callable[[int, int], None] | None = None,
    resolved: ResolvedModel | None = None,
    check: Callable[[LmConfig], None] | None = None,
    codec: CodecChoice = CodecChoice(),
) -> Assets:
    """The one front door: the LM, Mimi and the text tokenizer for `source` (or the demo stand-ins).

    `log` takes status lines and `progress(done, total)` the loading of the LM's layers; `resolved`:
    `resolve_model(source)`'s answer when the caller found the files already (before opening devices).
    `check(config)` runs once the LM's config is known and before any weight loads (e.g. a condition the
    model cannot take). `codec` picks the Mimi (rustymimi by default, the MLX one where rustymimi is missing or
    asked for) with as many codebooks as the LM.
    Errors are one-line `MoshiError`s (HubError, WeightsError, ...).
    """
    from ..audio.codec_choice import open_mimi  # a codec is only needed once we really load
    from ..codec.config import CODEBOOK_SIZE

    start = time.perf_counter()
    if demo:
        refuse_demo_flags(source)
        stt = demo == STT_DEMO
        lm = demo_lm(config=config_tiny_stt() if stt else None)
        if check is not None:
            check(lm.config)
        log(STT_DEMO_BANNER if stt else DEMO_BANNER)
        files = demo_assets()
        mimi = open_mimi(files.mimi_path, lm.config.mimi_codebooks, codec, log)
        tok = TextTokenizer(files.tokenizer_path)
        what = "demo (tiny random speech-to-text model, random Mimi)" if stt else "demo (tiny random LM, random Mimi)"
        return Assets(lm, mimi, tok, what, True, time.perf_counter() - start, lm_file="none: random demo weights")

    resolved = resolved or resolve_model(source)
    files, config = resolved.files, resolved.config
    if check is not None:
        check(config)
    if config.audio_card != CODEBOOK_SIZE:  # Mimi's codes would fall outside the model's audio vocabulary
        raise WeightsError(f"the model's audio card {config.audio_card} is not Mimi's {CODEBOOK_SIZE} codes: "
                           "not a model for this codec")
    at_load = resolved.quantize_at_load  # -q on float weights; an MLX quantized file carries its own bits
    log(f"loading Moshi weights from {files.moshi}" + (f", quantizing them to {at_load} bits" if at_load else ""))
    lm = load_lm(resolved.checkpoint, config, DTYPES[dtype] if dtype else None, progress, quantize=at_load)
    mimi = open_mimi(files.mimi, config.mimi_codebooks, codec, log)  # 8 for Moshi, 16 for Hibiki 2B, 32 for STT
    tok = TextTokenizer(files.tokenizer)
    if tok.vocab_size < config.text_out_vocab_size:
        raise WeightsError(
            f"text tokenizer {files.tokenizer} has {tok.vocab_size} pieces but the model emits {config.text_out_vocab_size}"
        )
    label = files.repo or str(Path(files.moshi).parent)
    voices_dir = None
    if files.voices is not None:
        voices_dir = ready_voices(files.voices, log)
        log(f"voice presets of {files.voices} in {voices_dir}: {', '.join(list_voices(voices_dir)) or 'none'}")
    elif files.voices_note:
        log(files.voices_note)
    return Assets(lm, mimi, tok, label, False, time.perf_counter() - start, lm_file=str(files.moshi),
                  voices_dir=voices_dir)
