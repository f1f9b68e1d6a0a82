"""Memory of the whole app per --kv-bits at a position past the full window, and Mimi RSS over a long run.

    python benchmarks/bench_memory.py --config small --dtype bf16 --kv-bits 4 8 16 --pipeline
    python benchmarks/bench_memory.py --config 7b --dtype q4 --kv-bits 4 --steps 2 --pipeline
    python benchmarks/bench_memory.py --long --minutes 1 10 60        # Mimi alone, faster than real time

Random weights in the published layouts; nothing is downloaded. Results as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from moshi_mlx.benchmark import memory_at_position, random_lm, rss_now_bytes
from moshi_mlx.demo import demo_assets
from moshi_mlx.memory import mimi_long_run
from moshi_mlx.mimi import Mimi
from moshi_mlx.models.config import PRESETS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="small")
    p.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16", "q8", "q4"])
    p.add_argument("--kv-bits", type=int, nargs="+", choices=(16, 8, 4), default=[4, 8, 16],
                   help="measured in this order (process peak RSS only grows: smallest footprint first)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pipeline", action="store_true", help="also run Mimi (both directions) each step")
    p.add_argument("--long", action="store_true", help="Mimi alone: RSS at the --minutes of audio")
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    args = p.parse_args(argv)
    out: dict = {"rss_start_gb": round((rss_now_bytes() or 0) / 1e9, 3)}
    if args.long:
        mimi = Mimi(demo_assets().mimi_path)
        out["mimi_long"] = mimi_long_run(mimi, args.minutes, log=lambda s: print(s, file=sys.stderr, flush=True))
    else:
        lm, build_s = random_lm(args.config, args.dtype)
        out["build_s"] = round(build_s, 1)
        position = lm.config.transformer.context + 100  # past the full window: every slot attended
        out["runs"] = []
        mimi = None
        for bits in args.kv_bits:
            r = memory_at_position(lm, bits, position, args.steps)
            out["runs"].append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            if args.pipeline:
                if mimi is None:  # loaded only now, so the LM-alone figures above do not include it
                    mimi = Mimi(demo_assets().mimi_path)
                    out["rss_after_mimi_gb"] = round((rss_now_bytes() or 0) / 1e9, 3)
                r = memory_at_position(lm, bits, position, args.steps, mimi=mimi)
                out["runs"].append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
