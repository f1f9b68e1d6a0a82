"""The two Mimi codecs side by side: rustymimi and the MLX Mimi, on the same random weights, in one run.

    python benchmarks/bench_mimi.py                       # ms per frame (alternating), memory of each
    python benchmarks/bench_mimi.py --frames 100 --long-frames 3000   # and RSS over 4 minutes of audio
    python benchmarks/bench_mimi.py --child mlx --frames 3000 --every 125 --start-frame 64000  # across the move back

Timing: both codecs loaded in one process, frames alternating between them (encode, then decode of the
same codes), so load on the machine hits both alike; the ratio is MLX / rustymimi. Memory: each codec in a
fresh process of its own: RSS growth at load, and after ``--frames`` frames both ways. ``--long-frames``:
RSS of the MLX Mimi every 250 frames (20 s of audio), and its slope. Prints a table on stderr and JSON on
stdout. Random weights in the published layout (written once to a temporary folder; nothing downloaded).
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moshi_mlx.audio.frames import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.memory import rss_bytes

CODECS = ("rustymimi", "mlx")


def signal(i: int, rng: np.random.Generator) -> np.ndarray:
    """A frame of tone and noise that changes from frame to frame."""
    t = (np.arange(FRAME_SIZE) + i * FRAME_SIZE) / SAMPLE_RATE
    return (0.1 * np.sin(2 * np.pi * (120 + i % 50) * t) + 0.01 * rng.standard_normal(FRAME_SIZE)).astype(np.float32)


def open_codec(name: str, path: str, device: str):
    from moshi_mlx.audio.codec_choice import CodecChoice, open_mimi

    return open_mimi(path, 8, CodecChoice(name, device if name == "mlx" else None))


def stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"mean_ms": round(float(a.mean()), 2), "median_ms": round(float(np.median(a)), 2),
            "p95_ms": round(float(np.percentile(a, 95)), 2)}


def timing(path: str, frames: int, warmup: int, device: str) -> dict:
    codecs = {name: open_codec(name, path, device) for name in CODECS}
    rng = np.random.default_rng(0)
    times: dict[str, dict[str, list[float]]] = {n: {"encode": [], "decode": []} for n in CODECS}
    for i in range(warmup + frames):
        pcm = signal(i, rng)
        for name, codec in codecs.items():
            t0 = time.perf_counter()
            codes = codec.encode_frame(pcm)
            t1 = time.perf_counter()
            codec.decode_frame(codes)
            t2 = time.perf_counter()
            if i >= warmup:
                times[name]["encode"].append((t1 - t0) * 1e3)
                times[name]["decode"].append((t2 - t1) * 1e3)
    for codec in codecs.values():
        codec.close()
    out = {name: {k: stats(v) for k, v in d.items()} for name, d in times.items()}
    for k in ("encode", "decode"):
        out[f"ratio_{k}_median"] = round(out["mlx"][k]["median_ms"] / out["rustymimi"][k]["median_ms"], 2)
    return out


def memory_child(name: str, path: str, frames: int, device: str, every: int, start_frame: int = 0) -> dict:
    """In a fresh process: RSS before and after loading one codec, then along ``frames`` frames both ways.

    ``start_frame``: the MLX Mimi's streams start that many frames in (its positions move back at frame
    65536, 87 minutes of audio: a start shortly before puts that move inside a short run)."""
    import mlx.core as mx  # noqa: F401  (MLX's own start-up is not the codec's)

    base = rss_bytes()
    codec = open_codec(name, path, device)
    loaded = rss_bytes()
    if start_frame:
        if name != "mlx":
            raise SystemExit("--start-frame: the MLX Mimi only")
        codec.start_at(start_frame)
    rng = np.random.default_rng(1)
    curve = []
    start = time.perf_counter()
    for i in range(1, frames + 1):
        codec.decode_frame(codec.encode_frame(signal(i, rng)))
        if i % every == 0 or i == frames:
            curve.append((i, round(rss_bytes() / 1e6, 1), round(time.perf_counter() - start, 1)))
            if name == "mlx":  # where the stream's positions are: shows the move back when it happens
                curve[-1] += (codec._enc.window.offset, codec._enc.window.rebased)
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)  # progress, and a record if stopped early
    return {"codec": name, "start_frame": start_frame, "load_mb": round((loaded - base) / 1e6, 1), "rss_after_load_mb": round(loaded / 1e6, 1),
            "reported_mb": round(codec.resident_bytes / 1e6, 1), "note": codec.memory_note, "curve": curve}


def in_child(name: str, path: str, frames: int, device: str, every: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, __file__, "--child", name, "--weights", path, "--frames", str(frames),
            "--device", device, "--every", str(every)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def slope_mb_per_min(curve: list, skip_frames: int) -> float:
    """Least-squares RSS slope (MB per minute of audio) past ``skip_frames`` (the window's first fill)."""
    pts = [(p[0] / FRAME_RATE / 60, p[1]) for p in curve if p[0] > skip_frames]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts).T
    return round(float(np.polyfit(x, y, 1)[0]), 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="a Mimi .safetensors (default: a random one in a temp dir)")
    p.add_argument("--frames", type=int, default=60, help="frames timed per codec (and run for memory)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="the MLX Mimi's device")
    p.add_argument("--long-frames", type=int, default=0, help="also: the MLX Mimi's RSS over this many frames")
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--start-frame", type=int, default=0,
                   help="the MLX Mimi's streams start this many frames in (with --child mlx)")
    p.add_argument("--child", choices=CODECS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(args.child, args.weights, args.frames, args.device, args.every,
                                      args.start_frame)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = args.weights
        if path is None:
            from moshi_mlx.model_files.stand_ins import write_random_mimi

            path = str(write_random_mimi(Path(tmp) / "mimi.safetensors"))
        say = lambda s: print(s, file=sys.stderr, flush=True)
        result: dict = {"frames": args.frames, "device": args.device}
        result["timing"] = t = timing(path, args.frames, args.warmup, args.device)
        say(f"{'ms per 80 ms frame':<20} {'rustymimi':>22} {'MLX Mimi':>22} {'ratio':>6}")
        for k in ("encode", "decode"):
            r, m = t["rustymimi"][k], t["mlx"][k]
            say(f"{k:<20} {r['median_ms']:>9.1f} (mean {r['mean_ms']:>6.1f}) {m['median_ms']:>9.1f} "
                f"(mean {m['mean_ms']:>6.1f}) {t[f'ratio_{k}_median']:>6.2f}")
        result["memory"] = mem = {n: in_child(n, path, args.frames, args.device, args.every) for n in CODECS}
        for n, m in mem.items():
            say(f"{n:<10} load +{m['load_mb']:.0f} MB RSS, reports {m['reported_mb']:.0f} MB ({m['note']}); "
                f"RSS {m['curve'][-1][1]:.0f} MB after {args.frames} frames")
        if args.long_frames:
            long = in_child("mlx", path, args.long_frames, args.device, args.every)
            long["slope_mb_per_min_after_first_window"] = slope_mb_per_min(long["curve"], 250)
            result["long"] = long
            for f, mb, s, *_ in long["curve"]:
                say(f"  frame {f:>6} ({f / FRAME_RATE:>6.0f} s of audio, {s:>6.0f} s wall): RSS {mb:.1f} MB")
            say(f"  slope past the first window: {long['slope_mb_per_min_after_first_window']} MB per minute of audio")
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
