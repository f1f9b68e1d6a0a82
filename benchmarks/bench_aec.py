#!/usr/bin/env python3
"""Time moshi_mlx.audio.echo.EchoCanceller per 80 ms frame (24 kHz, 1920 samples).

One timed unit = ``process_far(frame)`` + ``process_near(frame)``, i.e. what the
app does per frame.  The signals are a speech-like far signal (noise shaped by
a syllable-rate envelope) and a mic made of its delayed, attenuated echo plus a
second talker and noise, so the echo canceller and noise suppressor do real
work.  Also times the bare livekit FFI calls (one 10 ms ``process_stream``) to
show how much of the cost is per-call overhead.

Prints one JSON object on stdout, then a small table on stderr.

    python benchmarks/bench_aec.py [--frames 250] [--warmup 25]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

SR, FRAME = 24000, 1920


def speechlike(n: int, rng: np.random.Generator, rate_hz: float) -> np.ndarray:
    t = np.arange(n) / SR
    env = np.clip(np.sin(2 * np.pi * rate_hz * t + rng.uniform(0, 6.28)), 0, None) ** 2
    x = np.cumsum(rng.standard_normal(n)) * 0.02  # reddish
    x -= np.convolve(x, np.ones(240) / 240, mode="same")
    return (x * env * 0.3 / (np.std(x) + 1e-9)).astype(np.float32)


def stats_ms(ts: list[float]) -> dict:
    a = np.asarray(ts) * 1e3
    return {
        "median_ms": round(float(np.median(a)), 4),
        "p90_ms": round(float(np.percentile(a, 90)), 4),
        "max_ms": round(float(a.max()), 4),
        "mean_ms": round(float(a.mean()), 4),
    }


def bench_canceller(far, mic, frames, warmup, **opts) -> dict:
    from moshi_mlx.audio.echo import EchoCanceller

    ec = EchoCanceller(sample_rate=SR, frame_size=FRAME, delay_ms=120, **opts)
    ts = []
    for k in range(warmup + frames):
        f = far[k * FRAME : (k + 1) * FRAME]
        m = mic[k * FRAME : (k + 1) * FRAME]
        t0 = time.perf_counter()
        ec.process_far(f)
        ec.process_near(m)
        if k >= warmup:
            ts.append(time.perf_counter() - t0)
    ec.close()
    return stats_ms(ts)


def bench_ffi_call(n: int = 2000) -> dict:
    from livekit import rtc

    apm = rtc.AudioProcessingModule()  # nothing enabled: pure call overhead
    buf = bytearray(2 * SR // 100)
    fr = rtc.AudioFrame(buf, SR, 1, SR // 100)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        apm.process_stream(fr)
        ts.append(time.perf_counter() - t0)
    return stats_ms(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=250, help="timed frames per variant")
    ap.add_argument("--warmup", type=int, default=25)
    args = ap.parse_args()

    try:
        from livekit import rtc

        lk_version = _dist_version("livekit") or getattr(rtc, "__version__", None)
    except ImportError as e:
        print(json.dumps({"error": f"livekit not importable: {e}"}))
        sys.exit(1)

    rng = np.random.default_rng(0)
    n = (args.frames + args.warmup) * FRAME
    far = speechlike(n, rng, 2.0)
    d = int(0.1 * SR)
    echo = np.concatenate([np.zeros(d, np.float32), far[:-d]]) * 0.5
    mic = (echo + speechlike(n, rng, 1.5) * 0.7 + rng.standard_normal(n) * 1e-3).astype(np.float32)

    variants = {
        "aec+ns+hpf (default)": {},
        "aec only": dict(noise_suppression=False, high_pass_filter=False),
    }
    results = {name: bench_canceller(far, mic, args.frames, args.warmup, **opts)
               for name, opts in variants.items()}
    ffi = bench_ffi_call()
    out = {
        "benchmark": "aec_per_80ms_frame",
        "unit": "process_far + process_near of one 1920-sample frame at 24 kHz",
        "livekit": lk_version,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "frames": args.frames,
        "results": results,
        "ffi_process_stream_10ms_noop": ffi,
        "calls_per_frame": "1 set_stream_delay_ms + 8 process_reverse_stream + 8 process_stream",
        "frame_budget_ms": 80.0,
    }
    print(json.dumps(out))
    w = max(len(k) for k in results) + 2
    print(f"\n{'variant':<{w}}{'median ms':>10}{'p90 ms':>10}{'max ms':>10}{'% of 80ms':>11}",
          file=sys.stderr)
    for name, r in results.items():
        print(f"{name:<{w}}{r['median_ms']:>10.3f}{r['p90_ms']:>10.3f}{r['max_ms']:>10.3f}"
              f"{100 * r['median_ms'] / 80:>10.2f}%", file=sys.stderr)
    print(f"{'(bare FFI call, 10 ms)':<{w}}{ffi['median_ms']:>10.3f}{ffi['p90_ms']:>10.3f}"
          f"{ffi['max_ms']:>10.3f}", file=sys.stderr)


def _dist_version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
