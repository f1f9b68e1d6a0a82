"""A PyTorch-layout Moshi checkpoint (Kyutai's `-candle` / `-pytorch` repositories) read into our tensor names in
memory, through the same name plan `convert` follows (`moshi_mlx.models.pytorch.plan_conversion`).

Lazy: `mx.load` maps the file, and each MLX tensor is a view (rows of a stacked weight, reshaped norms) that is
read only when the model materialises it. No file is written; `load_lm` quantizes afterwards if asked.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..errors import MoshiError
from ..models.pytorch import ConvertError, plan_conversion
from .depformer_steps import keep_steps

#: Source dtypes a float checkpoint may hold.
FLOAT_CODES = ("BF16", "F16", "F32")


def pytorch_weights(
    path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
    schedule: list[int] | None = None, where: str | None = None, steps: int | None = None,
) -> dict[str, mx.array]:
    """Our name -> tensor for every tensor of the PyTorch checkpoint at `path` (its header's `shapes`/`dtypes`).

    `steps`: the depformer steps the model runs; a checkpoint with more (PersonaPlex: 16, of which a
    conversation uses 8) gives only its first `steps`, as `convert --max-out-n-q` would.
    """
    where = where or str(path)
    try:
        plan = plan_conversion(shapes, schedule)
        if steps is not None and 0 < steps < plan.dims.dep_q:
            plan = keep_steps(plan, steps)
    except ConvertError as e:
        raise MoshiError(f"{where}: {e}") from None
    for piece in plan.pieces:
        if dtypes[piece.source] not in FLOAT_CODES:
            raise MoshiError(f"{where}: tensor {piece.source} has dtype {dtypes[piece.source]}; expected a float")
    source = mx.load(str(path))
    out: dict[str, mx.array] = {}
    for piece in plan.pieces:
        x = source[piece.source]
        if piece.chunk is not None:  # one weight set of the older stacked depformer projections
            i, n = piece.chunk
            rows = x.shape[0] // n
            x = x[i * rows : (i + 1) * rows]
        out[piece.name] = x.reshape(piece.shape)
    return out
