#!/usr/bin/env python3
"""What the audio callbacks cost per 80 ms block: resampling the mic to 24 kHz frames and Moshi's frames to
the speaker's rate, for the device rates Macs and PCs use (48 and 44.1 kHz).

    python benchmarks/bench_callback.py                      # this checkout's callback path (soxr)
    python benchmarks/bench_callback.py --compare-rev 24492d9 # side by side with the resampler of a git revision

`--compare-rev` loads `moshi_mlx/audio.py` of that revision (the numpy polyphase filter before soxr) from git,
so both are timed in one run on the same machine. Prints a table and JSON (`--json PATH` writes it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moshi_mlx.audio.devices import _FrameAssembler  # noqa: E402
from moshi_mlx.audio.frames import FRAME_SIZE, SAMPLE_RATE, Resampler  # noqa: E402


def _old_resampler(rev: str):
    """The Resampler class of `moshi_mlx/audio.py` at a git revision (loaded standalone)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:moshi_mlx/audio.py"],
                            capture_output=True, text=True, check=True).stdout
    source = source.replace("from .errors import first_line", "first_line = str")
    path = Path(tempfile.mkdtemp()) / "old_audio.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_audio", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_audio"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.Resampler


def _time(fn, blocks: int) -> dict[str, float]:
    times = []
    for i in range(blocks):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    times = times[blocks // 10 :]  # the first blocks fill the filters
    return {"median_ms": round(statistics.median(times), 4), "max_ms": round(max(times), 4)}


def measure(make_resampler, rate: int, blocks: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    block = int(round(rate * FRAME_SIZE / SAMPLE_RATE))  # one 80 ms block at the device rate
    mic_in = (0.1 * rng.standard_normal(block)).astype(np.float32)
    frame = (0.1 * rng.standard_normal(FRAME_SIZE)).astype(np.float32)
    mic, spk = make_resampler(rate, SAMPLE_RATE), make_resampler(SAMPLE_RATE, rate)
    return {"mic": _time(lambda i: mic.process(mic_in), blocks), "speaker": _time(lambda i: spk.process(frame), blocks)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=500, help="80 ms blocks timed per direction (default 500)")
    ap.add_argument("--compare-rev", metavar="REV", help="also time the resampler of this git revision")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args(argv)

    impls = {"current (soxr)": Resampler}
    if args.compare_rev:
        impls[f"{args.compare_rev} (numpy polyphase)"] = _old_resampler(args.compare_rev)
    results = {name: {str(rate): measure(make, rate, args.blocks) for rate in (48000, 44100)} for name, make in impls.items()}
    # The whole mic path as the callback runs it (resampler + re-chunker), for the record.
    assembler = _FrameAssembler(48000)
    results["current mic path (48 kHz, incl. re-chunking)"] = {
        "48000": {"mic": _time(lambda i: assembler.push(np.zeros(3840, np.float32)), args.blocks)}
    }

    print(f"{'implementation':<44} {'rate':>6} {'mic ms':>9} {'speaker ms':>11}   (median per 80 ms block)")
    for name, by_rate in results.items():
        for rate, r in by_rate.items():
            spk = r.get("speaker", {}).get("median_ms")
            print(f"{name:<44} {rate:>6} {r['mic']['median_ms']:>9.4f} {spk if spk is not None else '':>11}")
    text = json.dumps({"blocks": args.blocks, "results": results}, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
