"""Key/value caches with a fixed footprint.

Keys are stored with their rotary position already applied, so attention over the slots
does not depend on slot order: a full window is overwritten round-robin (oldest first)
and step cost and memory stay flat however long a session runs.

Everything that changes from step to step (write slot, absolute position, which slots are
valid) is passed in as arrays in a `StepContext`, so a compiled step never retraces for a
new position; only the attended length changes, in coarse buckets, until the window fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# The attended length grows in buckets of this many slots until the window is full:
# early steps stay cheap while a compiled step is traced at most capacity / bucket times.
LENGTH_BUCKET = 256


@dataclass
class StepContext:
    position: mx.array  # int32 scalar: absolute position of this step (for RoPE)
    slot: mx.array  # int32 [1]: where this step's keys go in the window
    mask: mx.array  # bool [1, 1, 1, L]: which of the first L slots hold real keys

    @staticmethod
    def for_position(position: int, capacity: int) -> "StepContext":
        filled = min(position + 1, capacity)
        length = min(capacity, -(-filled // LENGTH_BUCKET) * LENGTH_BUCKET)
        valid = np.arange(length) < filled
        return StepContext(
            position=mx.array(position, dtype=mx.int32),
            slot=mx.array([position % capacity], dtype=mx.int32),
            mask=mx.array(valid)[None, None, None, :],
        )


class RotatingKVCache:
    """One layer's window of `capacity` positions, preallocated."""

    def __init__(self, keys: mx.array, values: mx.array) -> None:
        self.keys = keys
        self.values = values

    @classmethod
    def allocate(cls, batch: int, num_heads: int, head_dim: int, capacity: int, dtype: mx.Dtype) -> "RotatingKVCache":
        shape = (batch, num_heads, capacity, head_dim)
        keys, values = mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype)
        mx.eval(keys, values)  # materialise here so any thread can step the session later
        return cls(keys, values)

    def update(self, keys: mx.array, values: mx.array, ctx: StepContext) -> tuple[mx.array, mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys.astype(self.keys.dtype), ctx.slot, axes=(2,))
        self.values = mx.slice_update(self.values, values.astype(self.values.dtype), ctx.slot, axes=(2,))
        length = ctx.mask.shape[-1]
        return self.keys[:, :, :length], self.values[:, :, :length], ctx.mask


class FrameCache:
    """Causal cache over the few depformer steps of one frame; lives only inside that frame."""

    def __init__(self) -> None:
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []

    def update(self, keys: mx.array, values: mx.array, ctx: StepContext | None) -> tuple[mx.array, mx.array, None]:
        self.keys.append(keys)
        self.values.append(values)
        return mx.concatenate(self.keys, axis=2), mx.concatenate(self.values, axis=2), None


class TemporalCache:
    """The temporal transformer's per-layer windows plus the session position."""

    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int, capacity: int, dtype: mx.Dtype):
        self.capacity = capacity
        self.layers = [RotatingKVCache.allocate(batch, num_heads, head_dim, capacity, dtype) for _ in range(num_layers)]
        self.position = 0

    def reset(self) -> None:
        # Slots that are not valid are masked out, so old contents need no clearing.
        self.position = 0

    def context(self) -> StepContext:
        return StepContext.for_position(self.position, self.capacity)

    @property
    def state(self) -> list[mx.array]:
        return [a for layer in self.layers for a in (layer.keys, layer.values)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)
