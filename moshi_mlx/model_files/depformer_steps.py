"""Keep the first N depformer steps of a checkpoint (`convert --max-out-n-q N`), as Kyutai's import scripts offer.

A model trained to generate 16 codebooks per frame (Hibiki 2B) can run generating only the first 8: the
depformer is causal over its steps, so steps 0..N-1 do not depend on the later ones. Kyutai's
scripts/import_mlx.py (`--max-out-n-q`) exports slices 0..N-1 only, and scripts/import_pytorch.py
(`--out_n_q`) writes `dep_q` N with the weights-per-step schedule cut to its first N entries; the temporal
transformer, its input codebooks (`n_q`) and the delays are unchanged.
"""

from __future__ import annotations

import dataclasses
import re

from ..models.pytorch import ConvertError, Plan

__all__ = ["check_count", "keep_steps", "trimmed_config"]

_SLICE = re.compile(r"depformer\.slices\.(\d+)\.")


def check_count(n: int | None) -> None:
    """`n` must be a positive step count (None: keep them all); checked before any file is read."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConvertError(f"--max-out-n-q must be a positive number of depformer steps, got {n!r}")


def keep_steps(plan: Plan, n: int | None) -> Plan:
    """The plan without the MLX tensors of depformer slices n and later."""
    if n is None:
        return plan
    check_count(n)
    if n > plan.dims.dep_q:
        raise ConvertError(f"--max-out-n-q {n}: the checkpoint's depformer has only {plan.dims.dep_q} steps")
    pieces = [p for p in plan.pieces if not ((m := _SLICE.match(p.name)) and int(m.group(1)) >= n)]
    return Plan(plan.layout, dataclasses.replace(plan.dims, dep_q=n), pieces)


def trimmed_config(config: dict | None, n: int | None, dep_q: int) -> dict | None:
    """The user's config.json for a model that keeps n of its dep_q depformer steps: dep_q and the schedule follow.

    A dep_q that disagrees with the checkpoint's is left as it is, for the config check to refuse.
    """
    if config is None or n is None:
        return config
    out = dict(config)
    if out.get("dep_q") == dep_q:
        out["dep_q"] = n
    schedule = out.get("depformer_weights_per_step_schedule")
    if isinstance(schedule, list):
        out["depformer_weights_per_step_schedule"] = schedule[:n]
    return out
