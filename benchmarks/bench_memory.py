"""Memory of the app per --kv-bits, past the full attention window, and Mimi's RSS over a long run.

    python benchmarks/bench_memory.py --config small -q 4 --kv-bits 4 8 16 --pipeline
    python benchmarks/bench_memory.py --config 7b -q 4 --kv-bits 4 --steps 2 --pipeline
    python benchmarks/bench_memory.py --config 7b -q 4 --kv-bits 4 --pipeline --mimi mlx --max-memory 5.2
    python benchmarks/bench_memory.py --long --minutes 1 10 60        # Mimi alone, faster than real time
    python benchmarks/bench_memory.py --long --mimi mlx --minutes 1 5  # the MLX Mimi instead of rustymimi

Each --kv-bits setting is one run of the benchmark (`python -m moshi_mlx.benchmark`, random weights in the
published layout, nothing downloaded) in its own process, so each peak RSS is that setting's alone. Prints a
table on stderr and JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moshi_mlx.audio.frames import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE  # noqa: E402
from moshi_mlx.memory import rss_bytes  # noqa: E402
from moshi_mlx.model_files.checkpoint import DTYPES  # noqa: E402
from moshi_mlx.models.config import PRESETS  # noqa: E402


def one_setting(args: argparse.Namespace, bits: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = ["--config", args.config, "--kv-bits", str(bits), "--steps", str(args.steps), "--warmup", "1",
                "--realtime-frames", "0", "--no-split", "--no-progress", "--json", str(out)]
        argv += ["-q", str(args.quantize)] if args.quantize else ["--dtype", args.dtype]
        argv += ["--mimi", args.mimi] if args.mimi else []
        argv += ["--max-memory", str(args.max_memory)] if args.max_memory else []
        if not args.pipeline:
            argv.append("--lm-only")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "moshi_mlx.benchmark", *argv], env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"kv-bits {bits}: the benchmark failed: {proc.stderr.strip().splitlines()[-1:]}")
        result = json.loads(out.read_text())
        memory_line = next((ln.strip() for ln in proc.stderr.splitlines() if "memory:" in ln), None)
    memory = result["memory"]
    return {
        "kv_bits": bits,
        "max_memory_gb": args.max_memory,
        "context": result["settings"]["context"],  # the attention window the plan chose (full: the model's)
        "memory_line": memory_line,
        "mimi_note": memory.get("mimi_note"),
        "weights_gb": memory["weights_gb"],
        "kv_cache_gb": memory["kv_cache_gb"],
        "lm_alone": memory["lm"],
        "mimi_gb": memory["mimi_gb"],
        # The LM's share of the process: its RSS peak less Mimi's instances (loaded beside it), over its weights.
        "lm_rss_over_weights": round((memory["lm"]["rss_peak_gb"] - memory["mimi_gb"]) / memory["weights_gb"], 3),
        "pipeline": memory["pipeline"],
        "process_rss_peak_gb": memory["rss_peak_gb"],
        "step_ms_median": result["lm"]["step"]["median_ms"],
    }


def mimi_long_run(
    mimi, minutes: list[float], log: Callable[[str], None] = lambda s: None, seed: int = 0
) -> dict[str, float]:
    """Encode and decode ``max(minutes)`` of synthetic audio through ``mimi`` as fast as it goes.

    Returns {"rss_mb_at_min_<m>": RSS in MB after that many minutes of audio, "rss_max_mb_min_<m>": the highest
    RSS seen during that minute}. RSS saw-tooths with Mimi's turns (one minute each, see mimi.py), so the
    per-minute maximum is the figure to compare across minutes. Faster than real time is fine: what is
    measured is memory against frames processed, not timing.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(FRAME_SIZE) / SAMPLE_RATE
    marks = {int(round(m * 60 * FRAME_RATE)): m for m in sorted(minutes)}
    total = max(marks)
    out: dict[str, float] = {}
    start = time.perf_counter()
    frames_per_minute = int(60 * FRAME_RATE)
    minute_max = 0
    for i in range(1, total + 1):
        # A tone with noise that changes every frame: the codec sees varying input, not silence.
        pcm = (0.1 * np.sin(2 * np.pi * (120 + i % 50) * t) + 0.01 * rng.standard_normal(FRAME_SIZE)).astype(np.float32)
        mimi.decode_frame(mimi.encode_frame(pcm))
        if i % 25 == 0 or i in marks:  # 2 samples per second of audio
            now = rss_bytes()
            minute_max = max(minute_max, now)
        if i in marks:
            out[f"rss_max_mb_min_{marks[i]:g}"] = minute_max / 1e6
            out[f"rss_mb_at_min_{marks[i]:g}"] = now / 1e6  # the same reading, so max >= at
            log(f"minute {marks[i]:g}: RSS {out[f'rss_mb_at_min_{marks[i]:g}']:.1f} MB "
                f"(max in that minute {minute_max / 1e6:.1f} MB; {i} frames, {time.perf_counter() - start:.0f} s, "
                f"loads {getattr(mimi, 'loads', 1)}, handoffs {getattr(mimi, 'handoffs', 0)})")
        if i % frames_per_minute == 0:
            minute_max = 0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="small")
    p.add_argument("-q", "--quantize", type=int, choices=(4, 8), default=None)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--kv-bits", type=int, nargs="+", choices=(16, 8, 4), default=[4, 8, 16])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="the LM's memory budget, as the app's --max-memory (it picks the KV window)")
    p.add_argument("--pipeline", action="store_true", help="also the full pipeline (LM + Mimi both ways)")
    p.add_argument("--long", action="store_true", help="Mimi alone: RSS at the --minutes of audio")
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    p.add_argument("--mimi", choices=("rustymimi", "mlx"), default=None,
                   help="the Mimi codec, of --long too (default: the app's)")
    args = p.parse_args(argv)
    if args.long:
        from moshi_mlx.audio.codec_choice import CodecChoice, open_mimi
        from moshi_mlx.model_files.stand_ins import demo_assets

        mimi = open_mimi(demo_assets().mimi_path, 8, CodecChoice(args.mimi))
        out: dict = {"mimi_long": mimi_long_run(mimi, args.minutes, log=lambda s: print(s, file=sys.stderr, flush=True))}
    else:
        runs = [one_setting(args, bits) for bits in args.kv_bits]
        print(f"{'kv-bits':>7} {'KV GB':>7} {'weights GB':>10} {'LM MLX peak':>11} {'LM RSS peak':>11} "
              f"{'Mimi GB':>7} {'(LM RSS - Mimi) / weights':>25} {'pipeline RSS peak':>17} {'step ms':>8}",
              file=sys.stderr)
        for r in runs:
            pipe = r["pipeline"]["rss_peak_gb"] if r["pipeline"] else None
            print(f"{r['kv_bits']:>7} {r['kv_cache_gb'] or 0:>7.3f} {r['weights_gb']:>10.3f} "
                  f"{r['lm_alone']['mlx_peak_gb']:>11.3f} {r['lm_alone']['rss_peak_gb']:>11.3f} "
                  f"{r['mimi_gb']:>7.3f} {r['lm_rss_over_weights']:>25.3f} "
                  f"{pipe if pipe is not None else '-':>17} {r['step_ms_median']:>8.1f}", file=sys.stderr)
        out = {"config": args.config, "mimi": args.mimi, "quantize": args.quantize, "dtype": args.dtype, "runs": runs}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
