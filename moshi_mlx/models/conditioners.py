"""Look-up-table conditioners (Kyutai's `lut` type) and their sum: the vector added to every temporal input.

Parameter names follow Kyutai's checkpoints, PyTorch and MLX alike:
`condition_provider.conditioners.<name>.embed.weight` [n_bins + 1, dim],
`condition_provider.conditioners.<name>.output_proj.weight` [d_model, dim] and, when learnt,
`condition_provider.conditioners.<name>.learnt_padding` [1, 1, d_model] (Kyutai uses it only for a missing
value, which `condition` refuses, so it is loaded and kept but never added).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn

from ..errors import MoshiError
from .config import ConditionerConfig

__all__ = ["ConditionError", "ConditionProvider", "LutConditioner"]


class ConditionError(MoshiError, ValueError):
    """A condition the model does not know (name or value); one line for the user."""


class LutConditioner(nn.Module):
    def __init__(self, cfg: ConditionerConfig, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_bins + 1, cfg.dim)  # the extra row is Kyutai's padding index
        self.output_proj = nn.Linear(cfg.dim, d_model, bias=False)
        if cfg.learn_padding:
            self.learnt_padding = mx.zeros((1, 1, d_model))

    def index(self, value: str) -> int:
        """The table row of a value: its place in possible_values, else Kyutai's hash of it."""
        values = self.cfg.possible_values
        if values is None:
            return int(hashlib.sha256(value.encode("utf-8")).hexdigest(), 16) % self.cfg.n_bins
        if value not in values:
            raise ConditionError(
                f"condition {self.cfg.name}={value!r} is not one of the model's values: {', '.join(values)}"
            )
        return values.index(value)

    def __call__(self, value: str) -> mx.array:
        """[1, 1, d_model] float32: the projected row of `value`.

        Computed in float32 whatever the model's dtype, as Kyutai keeps its condition provider in float32
        (its loader upcasts these tensors) and casts only the sum."""
        row = self.embed.weight[self.index(value)].astype(mx.float32)
        return (row @ self.output_proj.weight.astype(mx.float32).T)[None, None, :]


class ConditionProvider(nn.Module):
    """All of a model's conditioners, summed (Kyutai's fuser `sum`)."""

    def __init__(self, conditioners: tuple[ConditionerConfig, ...], d_model: int) -> None:
        super().__init__()
        self.conditioners = {c.name: LutConditioner(c, d_model) for c in conditioners}

    def __call__(self, values: Mapping[str, str]) -> mx.array:
        """The summed condition [1, 1, d_model]; every conditioner needs a value and no other name is allowed."""
        names = list(self.conditioners)
        unknown = [k for k in values if k not in self.conditioners]
        if unknown:
            raise ConditionError(f"the model has no condition {unknown[0]!r} (it has: {', '.join(names)})")
        missing = [k for k in names if k not in values]
        if missing:
            raise ConditionError(f"condition {missing[0]!r} needs a value")
        total = None
        for name in names:
            part = self.conditioners[name](str(values[name]))
            total = part if total is None else total + part
        assert total is not None
        return total
