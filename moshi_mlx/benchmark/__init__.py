"""How fast is Moshi on this machine, and does it keep up with real time?

    python -m moshi_mlx.benchmark -q 4                  # the published 4-bit Moshiko (downloads once)
    python -m moshi_mlx.benchmark --config small -q 4   # random weights in the published layout
    python -m moshi_mlx.benchmark --long                # one hour of audio on the tiny model: flat?

Modules: `run` (orchestration), `args` (flags), `models` (loading through `assets.load()`),
`measure` (the one timing loop, statistics, memory), `steps` (the LM step), `pipeline` (Mimi and
the engine), `long` (long sessions), `machine`, `results` (dataclasses, JSON) and `report`.
"""

from .report import format_table, pace, verdict
from .results import SCHEMA, BenchResult
from .run import main, run, time_lm_steps

__all__ = ["SCHEMA", "BenchResult", "format_table", "main", "pace", "run", "time_lm_steps", "verdict"]
