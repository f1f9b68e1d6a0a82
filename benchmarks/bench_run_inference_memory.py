"""Peak memory of ``run_inference --demo`` against the input's length.

    python benchmarks/bench_memory.py --minutes 1 60 [--max-seconds 240] [--rate 16000]

For each length, writes a speech-like test signal (block by block, so the generator stays small),
runs ``python -m moshi_mlx.run_inference IN OUT --demo`` and samples the child's RSS every second
(psutil: Linux and macOS alike); the peak is the kernel's high-water mark of the child (its rusage at exit,
from os.wait4), or the highest sample if that is larger. With ``--max-seconds`` a run
still going is interrupted (Ctrl-C) at that point: on CPU the demo model is slower than real time,
so a 60-minute file is measured over its first minutes, which shows whether RSS stays flat.
Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moshi_mlx.memory import maxrss_bytes  # noqa: E402


def write_input(path: Path, minutes: float, rate: int) -> None:
    """A voiced, syllable-rate modulated signal (not silence: the resampler and codec do real work)."""
    total = int(minutes * 60 * rate)
    block = rate * 10
    with sf.SoundFile(path, "w", rate, 1, "PCM_16") as f:
        for start in range(0, total, block):
            t = np.arange(start, min(start + block, total)) / rate
            f0 = 130 + 25 * np.sin(2 * np.pi * 0.3 * t)
            x = np.sin(2 * np.pi * np.cumsum(f0) / rate) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2)
            f.write((0.3 * x).astype(np.float32))


def rss_mb(pid: int) -> float | None:
    """The child's resident set now, in MiB (None once it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def reaped(proc: subprocess.Popen) -> float | None:
    """If the child has exited: reap it, set its return code, and give its peak RSS in MiB (else None)."""
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return maxrss_bytes(usage.ru_maxrss) / 2**20


def measure(minutes: float, rate: int, max_seconds: float | None, workdir: Path) -> dict:
    src, out = workdir / f"in_{minutes:g}min.wav", workdir / f"out_{minutes:g}min.wav"
    write_input(src, minutes, rate)
    cmd = [sys.executable, "-m", "moshi_mlx.run_inference", str(src), str(out), "--demo"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    log = workdir / f"log_{minutes:g}min.txt"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    samples: list[tuple[float, float]] = []
    peak = 0.0
    progress = ""
    interrupted = False
    while (exit_peak := reaped(proc)) is None:
        r = rss_mb(proc.pid)
        if r is not None:
            samples.append((round(time.monotonic() - start, 1), round(r, 1)))
            peak = max(peak, r)
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("moshi: ")]
        progress = lines[-1] if lines else progress
        if max_seconds is not None and time.monotonic() - start > max_seconds and not interrupted:
            proc.send_signal(signal.SIGINT)
            interrupted = True
        time.sleep(1.0)
    peak = max(peak, exit_peak)
    tail = log.read_text().strip().splitlines()
    after_load = [r for t, r in samples if t >= 20]  # model loaded, frames flowing
    return {
        "minutes": minutes,
        "input_mb": round(src.stat().st_size / 2**20, 1),
        "seconds": round(time.monotonic() - start, 1),
        "interrupted_at_s": max_seconds if interrupted else None,
        "last_progress": progress,
        "last_line": tail[-1] if tail else "",
        "returncode": proc.returncode,
        "peak_rss_mb": round(peak, 1),
        "rss_at_20s_mb": after_load[0] if after_load else None,
        "rss_last_mb": samples[-1][1] if samples else None,
        "rss_every_30s": [r for t, r in samples if int(t) % 30 == 0][:40],
        "command": " ".join(["python", "-m", "moshi_mlx.run_inference", src.name, out.name, "--demo"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1.0, 60.0])
    ap.add_argument("--rate", type=int, default=16000, help="input sample rate (resampled to 24 kHz)")
    ap.add_argument("--max-seconds", type=float, default=None, help="interrupt runs still going after this")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moshi-mem-") as d:
        for minutes in args.minutes:
            print(json.dumps(measure(minutes, args.rate, args.max_seconds, Path(d))), flush=True)


if __name__ == "__main__":
    main()
