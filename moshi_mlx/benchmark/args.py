"""The benchmark's command line: the app's own model and precision flags plus what to run; checked before loading."""

from __future__ import annotations

import argparse

from ..cli.flags import add_engine_args, add_transcribe_user_arg
from .loaded import RANDOM_CONFIGS
from .long import DEFAULT_LONG_STEPS

DEFAULT_STEPS = 200
DEFAULT_WARMUP = 20
DEFAULT_REALTIME_FRAMES = 100  # 8 s of audio fed at the real pace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.benchmark",
        description="Measure Moshi on this machine: load time, LM step and depformer share, Mimi, the whole "
        "pipeline, memory, and whether it keeps up with real time.",
        epilog="Examples: -q 4 | --moshi-weights model.q8.safetensors | --config small -q 4 | --config tiny "
        "--dtype float32 | --long",
    )
    add_engine_args(p, persona=True)  # -q, --hf-repo, --moshi-weights, ..., --demo, --dtype, sampling, --seed: as the app
    add_transcribe_user_arg(p)  # also time the user's STT model beside Moshi: the extra cost per frame
    g = p.add_argument_group("random weights (nothing downloaded; precision from -q and --dtype)")
    g.add_argument("--config", choices=sorted(RANDOM_CONFIGS),
                   help="random weights in the published layout of this config (hibiki-*: conditioned, so the step is "
                   "also timed with classifier-free guidance off and on)")
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="with --config: attention window of N steps instead of 3000 (e.g. a quick --long wrap-around)")
    r = p.add_argument_group("run")
    r.add_argument("--steps", type=int, default=None,
                   help=f"timed steps/frames per measurement (default {DEFAULT_STEPS}; {DEFAULT_LONG_STEPS} with --long)")
    r.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help=f"untimed steps first (default {DEFAULT_WARMUP})")
    r.add_argument("--position", default="full",
                   help="session position the timed steps start at: 'full' (default: attention window full, as after "
                   "~4 min of talk; the slowest case) or a number of steps (0 = fresh conversation)")
    r.add_argument("--realtime-frames", type=int, default=None, metavar="N",
                   help=f"frames fed at the real 80 ms pace (latency, dropped frames; default "
                   f"min({DEFAULT_REALTIME_FRAMES}, --steps); 0 skips)")
    r.add_argument("--lm-only", action="store_true", help="skip Mimi and the pipeline")
    r.add_argument("--stt-only", action="store_true",
                   help="time speech-to-text models alone instead of Moshi: step time and real-time factor per size "
                   "(random weights; --stt-size, -q, --dtype)")
    r.add_argument("--stt-size", default="1b,2.6b", metavar="SIZES",
                   help="with --stt-only: comma-separated sizes among tiny, 1b, 2.6b (default 1b,2.6b)")
    r.add_argument("--no-split", action="store_true", help="skip timing the step's two halves")
    r.add_argument("--long", action="store_true",
                   help=f"long session from a fresh start: {DEFAULT_LONG_STEPS} steps (one hour of audio; tiny config "
                   "unless a model is given); step time and memory at start, middle, end and minutes 1, 10, 60")
    r.add_argument("--long-pipeline", action="store_true", help="with --long: the whole engine (Mimi both ways) each step")
    r.add_argument("--device", choices=["cpu", "gpu"], default=None, help="MLX device (default: MLX's own choice)")
    r.add_argument("--json", metavar="PATH", default=None, help="write every figure as JSON here")
    r.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress on stderr (default: a live bar on a terminal, a line every 10 s otherwise)")
    return p


def _files_given(args: argparse.Namespace) -> list[str]:
    flags = {"hf_repo": "--hf-repo", "revision": "--revision", "moshi_weights": "--moshi-weights",
             "lm_config": "--lm-config"}
    return [flag for key, flag in flags.items() if getattr(args, key) is not None]


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse bad or conflicting flags with one line (parser.error: exit 2) before anything loads."""
    files = _files_given(args)
    if args.stt_only:
        from .stt import STT_SIZES

        sizes = [x.strip() for x in args.stt_size.split(",") if x.strip()]
        bad = [x for x in sizes if x not in STT_SIZES]
        if not sizes or bad:
            parser.error(f"--stt-size: choose among {', '.join(STT_SIZES)}, got {args.stt_size!r}")
        if files or args.demo or args.config or args.long or args.transcribe_user is not None:
            parser.error("--stt-only times random STT weights by itself: leave out the model flags, --demo, --config, "
                         "--long and --transcribe-user")
        args.stt_sizes = sizes
        args.steps = DEFAULT_STEPS if args.steps is None else args.steps
        if args.steps < 1 or args.warmup < 0:
            parser.error("--steps must be >= 1 and --warmup >= 0")
        return args
    if args.transcribe_user is not None and (args.lm_only or args.long):
        parser.error("--transcribe-user times the whole pipeline: leave out --lm-only and --long")
    if args.long and args.config is None and not files and args.quantize is None and not args.demo:
        args.config = "tiny"
    if args.demo and (args.config or files or args.quantize is not None):
        parser.error("--demo is its own model; leave out --config, -q and the model-file flags")
    if args.config is not None and files:
        parser.error(f"--config (random weights) cannot be combined with {files[0]}")
    if not args.demo and args.config is None and not files and args.quantize is None:
        parser.error("choose a model: -q 4, -q 8, --hf-repo REPO, --moshi-weights PATH, --demo, or random weights "
                     "with --config tiny|small|7b [-q 4|8] [--dtype float32]")
    if args.context is not None and (args.config is None or args.context < 1):
        parser.error("--context N (N >= 1) is for random weights (--config); a file's config.json sets its own")
    if args.long_pipeline and not args.long:
        parser.error("--long-pipeline goes with --long")
    if args.steps is None:
        args.steps = DEFAULT_LONG_STEPS if args.long else DEFAULT_STEPS
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.realtime_frames is None:
        args.realtime_frames = min(DEFAULT_REALTIME_FRAMES, args.steps)
    if args.realtime_frames < 0:
        parser.error("--realtime-frames must be >= 0")
    if args.position != "full" and not (args.position.isdigit()):
        parser.error(f"--position must be 'full' or a number of steps >= 0, got {args.position!r}")
    if args.seed is None:
        args.seed = 0  # a benchmark replays the same conversation
    return args


def start_position(position: str, context: int) -> int:
    return context if position == "full" else int(position)
