"""PyTorch Moshi checkpoint names for the conversion tests: the older stacked attention form."""

from __future__ import annotations

import re

STACKED = re.compile(r"(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight")


def legacy(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Rewrite current attention names into the older stacked `in_proj_weight` / `out_proj.weight` form."""
    out: dict[str, tuple[int, ...]] = {}
    stacked: dict[str, list[tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        m = STACKED.fullmatch(name)
        if m is None:
            out[name] = shape
            continue
        key = f"{m.group(1)}.in_proj_weight" if m.group(2) == "in" else f"{m.group(1)}.out_proj.weight"
        stacked.setdefault(key, []).append(shape)
    for key, parts in stacked.items():
        out[key] = (sum(p[0] for p in parts), parts[0][1])
    return out
