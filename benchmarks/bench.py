#!/usr/bin/env python3
"""Same as ``python -m moshi_mlx.benchmark`` (run from a checkout without installing).

    python benchmarks/bench.py -q 4 --json results/m2pro-q4.json
    python benchmarks/bench.py --config small -q 4 --steps 100
    python benchmarks/bench.py --long
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshi_mlx.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
