"""The flag groups every command shares, each defined once: model files, sampling, memory, codec, lag, verbosity,
a persona model's system prompt.

A bad value is one usage line (exit 2) before anything loads: the argparse types below check bounds.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..audio.codec_choice import CODECS, CodecChoice
from ..audio.mlx_mimi import DEFAULT_DEVICE, DEVICES
from ..conditioning import check_conditioning, model_settings
from ..model_files.assets import DEFAULT_STT_REPO, Assets, SttAssets, load, load_stt, refuse_demo_flags, resolve_stt
from ..model_files.checkpoint import DTYPES, ResolvedModel, resolve_model
from ..model_files.hub import MIMI_NAME, TOKENIZER_NAME
from ..model_files.source import ModelSource
from ..models.cache import DEFAULT_KV_BITS, KV_BITS
from ..models.config import LmConfig
from ..errors import UsageError
from ..settings import KNOBS, LM_GEN_KNOBS, TEXT_ONLY_KNOBS, TEXT_ONLY_NOTE, EngineSettings, Knob
from ..voices import load_voice, looks_like_path
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


def add_engine_args(parser: argparse.ArgumentParser, persona: bool = False) -> None:
    """Model, sampling and demo flags shared by every entry point (`persona`: the system prompt's too)."""
    add_model_args(parser)
    parser.add_argument("--demo", action="store_true", help="tiny random model + random Mimi: no download (babble)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype for unquantized weights")
    add_sampling_args(parser)
    add_verbose_arg(parser)
    add_memory_args(parser)
    add_codec_args(parser)
    if persona:
        add_persona_args(parser)


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


def add_persona_args(parser: argparse.ArgumentParser, remote: bool = False) -> None:
    """A persona model's system prompt (NVIDIA's PersonaPlex): the role text and the voice. `remote` (the
    client): the server's model takes them, so the voice is a name the server lists and there is no folder."""
    g = parser.add_argument_group("persona (a PersonaPlex model)")
    text = g.add_mutually_exclusive_group()
    text.add_argument("--text-prompt", default=None, metavar="TEXT",
                      help="the role: who Moshi is and how it talks (wrapped in <system> tags)")
    text.add_argument("--text-prompt-file", default=None, metavar="PATH", help="the role text, read from a file")
    if remote:
        g.add_argument("--voice", default=None, metavar="NAME",
                       help="one of the server's voice presets (its /api/info lists them; sent as voice_prompt)")
        return
    g.add_argument("--voice", default=None, metavar="NAME|PATH",
                   help="a voice preset's name (see --voices-dir), a recording (.wav, .flac...) or a converted preset "
                   "(.safetensors from `python -m moshi_mlx.convert --voices`)")
    g.add_argument("--voices-dir", default=None, metavar="DIR", help="folder of voice presets (NAME.safetensors)")


def persona_from_args(args: argparse.Namespace) -> dict[str, str | None]:
    """`text_prompt` and `voice` for EngineSettings from the persona flags (a file read here: one line if not)."""
    text = getattr(args, "text_prompt", None)
    path = getattr(args, "text_prompt_file", None)
    if path is not None:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--text-prompt-file {path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
        if not text.strip():
            raise UsageError(f"--text-prompt-file {path}: the file is empty")
    voice = getattr(args, "voice", None)
    if voice is not None and not voice.strip():
        raise UsageError("--voice: empty name")
    return {"text_prompt": text, "voice": voice}


def check_persona_args(args: argparse.Namespace) -> None:
    """The persona flags checked before anything loads: the prompt file read, --voices-dir a folder, a voice
    given by path (or by name beside --voices-dir) readable. A name that only the model's presets can answer
    is checked once the model is known."""
    persona = persona_from_args(args)
    folder = voices_dir_from_args(args)
    spec = persona["voice"]
    if spec is not None and (folder is not None or looks_like_path(spec.strip())):
        load_voice(spec, folder)


def voices_dir_from_args(args: argparse.Namespace) -> Path | None:
    """--voices-dir checked (a folder), or None."""
    folder = getattr(args, "voices_dir", None)
    if folder is None:
        return None
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UsageError(f"--voices-dir {folder}: no such folder")
    return path


def settings_from_args(
    args: argparse.Namespace, config: LmConfig | None = None, log: Callable[[str], None] = say
) -> EngineSettings:
    """The engine's settings: the table's defaults, then the model's `lm_gen_config`, then the flags given
    (a text-only model: one line names the flags it ignores); the persona flags' prompt and voice."""
    if config is not None and config.text_only:
        note_text_only_flags(args, log)
    settings = model_settings(config, given_knobs(args), kv_bits=getattr(args, "kv_bits", None))
    persona = persona_from_args(args)
    return replace(settings, **persona) if any(persona.values()) else settings


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


#: `--transcribe-user` given without REPO: the default STT model (the demo's stand-in with --demo).
_STT_DEFAULT = "default"


def add_transcribe_user_arg(parser: argparse.ArgumentParser) -> None:
    """--transcribe-user [REPO]: a speech-to-text model writes the user's side down too (local, local_web, client)."""
    g = parser.add_argument_group("your words")
    g.add_argument(
        "--transcribe-user", nargs="?", const=_STT_DEFAULT, default=None, metavar="REPO",
        help=f"also write down what you say, with a speech-to-text model beside Moshi in this process (default "
        f"{DEFAULT_STT_REPO}; a hub repo id or a local folder of its files; with --demo, a tiny random stand-in): "
        "the terminal shows both speakers with times, --record's transcript holds both, the web UI shows yours",
    )


def stt_repo(args: argparse.Namespace) -> str | None:
    """The REPO given to --transcribe-user (None: the default, or the demo's stand-in with --demo)."""
    value = getattr(args, "transcribe_user", None)
    return None if value in (None, _STT_DEFAULT) else value


def resolve_user_stt(args: argparse.Namespace) -> tuple[bool, object]:
    """(wanted, resolved): --transcribe-user checked and its files found before anything loads (one line if not)."""
    if getattr(args, "transcribe_user", None) is None:
        return False, None
    return True, resolve_stt(stt_repo(args), bool(getattr(args, "demo", False)))


def load_user_stt(args: argparse.Namespace, resolved: object, log: Callable[[str], None] = say) -> SttAssets:
    """The STT model for the user's words, with its own Mimi (the codec flags apply to it too)."""
    return load_stt(resolved, CodecChoice.from_args(args), log, getattr(args, "dtype", None))


def load_from_args(
    args: argparse.Namespace, log: Callable[[str], None] = say, resolved: ResolvedModel | None = None,
    stt: SttAssets | None = None,
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
    assets.plan_memory(getattr(args, "max_memory", None), getattr(args, "kv_bits", None), log, stt=stt)
    folder = voices_dir_from_args(args)
    if folder is not None:
        assets.voices_dir = folder
    return assets
