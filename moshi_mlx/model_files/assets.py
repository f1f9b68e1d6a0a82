"""One shared `load()`: the LM, Mimi and the text tokenizer, from the hub, local files or the demo stand-ins."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..audio.codec_choice import CodecChoice
from ..engine import ConversationEngine
from ..errors import MoshiError, UsageError, first_line
from ..models.cache import kv_cache_bytes
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

__all__ = ["DEMO_BANNER", "DEFAULT_STT_REPO", "Assets", "SttAssets", "SttError", "load", "load_stt", "resolve_stt", "say"]
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
        self, max_memory_gb: float | None = None, kv_bits: int | None = None, log: Callable[[str], None] | None = None,
        stt: "SttAssets | None" = None,
    ) -> MemoryPlan:
        """Fit the LM into ``max_memory_gb`` (default: the machine's), set MLX's limits, say what was chosen.
        ``stt``: the user's speech-to-text model (--transcribe-user), counted in the same budget."""
        t = self.lm.config.transformer
        budget = int(max_memory_gb * GB) if max_memory_gb is not None else machine_budget_bytes()
        # A conditioned model may run guided (two batch rows: any client may ask for it): room for both rows'
        # keys and values, whose bytes scale with heads x rows.
        rows = 2 if self.lm.config.is_conditioned else 1
        codec_bytes = getattr(self.mimi, "mlx_bytes", 0)  # the MLX Mimi lives inside MLX's allocator
        plan = plan_memory(
            weights_bytes(self.lm), t.num_layers, t.num_kv_heads * rows, t.head_dim, t.context, budget, kv_bits,
            dtype_bytes=self.lm.dtype.size, codec_bytes=codec_bytes,
            stt_bytes=stt.mlx_bytes if stt is not None else 0, stt_note=stt.memory_note() if stt is not None else "",
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


# --------------------------------------------------------------------------------------------------
# A speech-to-text model beside Moshi (--transcribe-user): the user's side written down
# --------------------------------------------------------------------------------------------------

#: The STT model `--transcribe-user` runs when no REPO is given (Kyutai's English/French 1B, MLX layout).
DEFAULT_STT_REPO = "kyutai/stt-1b-en_fr-mlx"
#: The demo's stand-in STT tokenizer (Kyutai's STT models read an 8000-piece vocabulary).
STT_TOKENIZER_FILE, STT_VOCAB = "tokenizer-stt-stand-in.model", 8000


class SttError(MoshiError, ValueError):
    """--transcribe-user REPO cannot be used (missing, unreadable, not a speech-to-text model); one line."""


@dataclass
class SttAssets:
    """What the user's transcriber needs: a text-only LM, its own Mimi (32 codebooks), its tokenizer."""

    lm: Lm
    mimi: object  # a moshi_mlx.audio.mimi.FrameCodec with lm.config.mimi_codebooks codebooks
    tokenizer: TextTokenizer
    description: str

    @property
    def mlx_bytes(self) -> int:
        """What it holds inside MLX's allocator: weights, a full window of 16-bit keys and values, an MLX Mimi."""
        t = self.lm.config.transformer
        kv = kv_cache_bytes(t.num_layers, t.num_kv_heads, t.head_dim, t.context, 16, self.lm.dtype.size)
        return weights_bytes(self.lm) + kv + int(getattr(self.mimi, "mlx_bytes", 0))

    @property
    def outside_bytes(self) -> int:
        """Its Mimi's memory outside MLX (rustymimi), 0 for the MLX Mimi."""
        return max(0, int(getattr(self.mimi, "resident_bytes", 0)) - int(getattr(self.mimi, "mlx_bytes", 0)))

    def memory_note(self) -> str:
        """The `memory:` line's part for it."""
        mimi_out = self.outside_bytes
        return (f"STT for your words ({self.description}) {self.mlx_bytes / GB:.2f} GB within it (weights, KV, "
                f"MLX Mimi)" + (f", its own 32-codebook Mimi {mimi_out / GB:.2f} GB on top" if mimi_out else ""))

    def close(self) -> None:
        close = getattr(self.mimi, "close", None)
        if close is not None:
            close()


def stt_source(repo: str) -> ModelSource:
    """`--transcribe-user REPO` as a model source: a hub repo id, or a local folder holding a published repo's
    files (config.json naming `moshi_name`, and `mimi_name` / `tokenizer_name` where they differ from Moshi's)."""
    folder = Path(repo).expanduser()
    if not folder.is_dir():
        if repo.startswith((".", "/", "~")) or repo.count("/") > 1:
            raise SttError(f"--transcribe-user {repo}: no such folder (and not a hub repo id like {DEFAULT_STT_REPO})")
        return ModelSource(hf_repo=repo)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SttError(f"--transcribe-user {repo}: the folder has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SttError(f"--transcribe-user {repo}: config.json cannot be read ({first_line(e)})") from None
    names = {key: config.get(key) for key in ("moshi_name", "mimi_name", "tokenizer_name")}
    missing = [key for key, name in names.items() if not name]
    if missing:
        raise SttError(f"--transcribe-user {repo}: config.json names no {', '.join(missing)}")
    return ModelSource(moshi_weights=str(folder / names["moshi_name"]), lm_config=str(config_path),
                       mimi_weights=str(folder / names["mimi_name"]), tokenizer=str(folder / names["tokenizer_name"]))


def resolve_stt(repo: str | None, demo: bool) -> ResolvedModel | None:
    """`--transcribe-user [REPO]` checked before anything loads: the files found, and the model a text-only one
    with an stt_config. None: the demo's stand-in (with --demo and no REPO). Errors: one line (SttError)."""
    if repo is None and demo:
        return None
    repo = repo or DEFAULT_STT_REPO
    try:
        resolved = resolve_model(stt_source(repo))
    except SttError:
        raise
    except MoshiError as e:
        line = first_line(e)
        line = line[len(repo) + 2:] if line.startswith(f"{repo}: ") else line  # the repo is named once
        line = line.replace("pass --moshi-weights PATH", "give --transcribe-user a local folder of its files")
        raise SttError(f"--transcribe-user {repo}: {line}") from None
    config = resolved.config
    if not config.text_only or config.stt is None:
        raise SttError(f"--transcribe-user {repo}: not a speech-to-text model (it needs dep_q 0 and an stt_config)")
    if config.audio_card != _codebook_size():
        raise SttError(f"--transcribe-user {repo}: its audio card {config.audio_card} is not Mimi's codes")
    return resolved


def _codebook_size() -> int:
    from ..codec.config import CODEBOOK_SIZE

    return CODEBOOK_SIZE


def load_stt(
    resolved: ResolvedModel | None, codec: CodecChoice = CodecChoice(), log: Callable[[str], None] = say,
    dtype: str | None = None,
) -> SttAssets:
    """The STT model `resolve_stt` found (None: the demo's tiny random stand-in), with its own Mimi."""
    from ..audio.codec_choice import open_mimi
    from .stand_ins import default_cache_dir, is_valid_tokenizer_file, write_stand_in_tokenizer

    if resolved is None:
        lm = demo_lm(seed=7, config=config_tiny_stt())
        files = demo_assets()
        tok_path = default_cache_dir() / STT_TOKENIZER_FILE
        if not is_valid_tokenizer_file(tok_path, STT_VOCAB):
            write_stand_in_tokenizer(tok_path, STT_VOCAB)
        mimi = open_mimi(files.mimi_path, lm.config.mimi_codebooks, codec, log)
        return SttAssets(lm, mimi, TextTokenizer(tok_path), "demo stand-in: tiny random STT")
    files = resolved.files
    log(f"loading the STT model for your words from {files.moshi}")
    lm = load_lm(resolved.checkpoint, resolved.config, DTYPES[dtype] if dtype else None, None,
                 quantize=resolved.quantize_at_load)
    mimi = open_mimi(files.mimi, resolved.config.mimi_codebooks, codec, log)
    tok = TextTokenizer(files.tokenizer)
    label = files.repo or str(Path(files.moshi).parent)
    return SttAssets(lm, mimi, tok, label)
