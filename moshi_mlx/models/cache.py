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

#: Supported key/value precisions: 16 = the model's dtype, 8 and 4 = affine-quantized with per-group scales.
KV_BITS = (16, 8, 4)
#: The app's default. Measured (random weights, small preset, f32 on a 2-core CPU, past the full window):
#: temporal step 414 ms at 16, 359 ms at 8, 314 ms at 4 bits; 8-bit logits within 0.3 % (99 % greedy
#: agreement), 4-bit within ~5 % (90 %). 8 bits: a quarter of the f32 cache, no measurable quality loss.
DEFAULT_KV_BITS = 8
#: Elements sharing one scale and bias in a quantized key/value row (head_dim must be a multiple).
KV_GROUP_SIZE = 64

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


def prefill_context(position: int, steps: int, capacity: int) -> StepContext:
    """Context for `steps` consecutive positions from `position` at once (a prompt known in advance): each
    attends to the slots up to its own. They must fit in the window without wrapping."""
    if position + steps > capacity:
        raise ValueError(f"{steps} steps from position {position} do not fit a window of {capacity}")
    filled = position + steps
    length = min(capacity, -(-filled // LENGTH_BUCKET) * LENGTH_BUCKET)
    valid = np.arange(length)[None, :] <= (position + np.arange(steps))[:, None]
    return StepContext(
        position=mx.array(position, dtype=mx.int32),
        slot=mx.array([position], dtype=mx.int32),
        mask=mx.array(valid)[None, None, :, :],
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


class QuantizedRotatingKVCache:
    """One layer's window stored at `bits` per element with per-group scales (mx.quantize layout).

    Each step quantizes only its own new key/value row; attention reads the stored window directly with
    mx.quantized_matmul, so no step ever dequantizes or casts the whole window.
    """

    def __init__(self, keys: tuple[mx.array, ...], values: tuple[mx.array, ...], bits: int, group_size: int) -> None:
        self.keys, self.values = keys, values
        self.bits, self.group_size = bits, group_size

    @classmethod
    def allocate(
        cls, batch: int, num_heads: int, head_dim: int, capacity: int, dtype: mx.Dtype, bits: int,
        group_size: int = KV_GROUP_SIZE,
    ) -> "QuantizedRotatingKVCache":
        group_size = min(group_size, head_dim)
        if head_dim % group_size:
            raise ValueError(f"head_dim {head_dim} is not a multiple of the KV group size {group_size}")
        lead = (batch, num_heads, capacity)

        def empty() -> tuple[mx.array, ...]:
            return (
                mx.zeros((*lead, head_dim * bits // 32), dtype=mx.uint32),
                mx.zeros((*lead, head_dim // group_size), dtype=dtype),
                mx.zeros((*lead, head_dim // group_size), dtype=dtype),
            )

        keys, values = empty(), empty()
        mx.eval(keys, values)
        return cls(keys, values, bits, group_size)

    def _write(self, stored: tuple[mx.array, ...], new: mx.array, slot: mx.array) -> tuple[mx.array, ...]:
        parts = mx.quantize(new.astype(stored[1].dtype), group_size=self.group_size, bits=self.bits)
        return tuple(mx.slice_update(s, p, slot, axes=(2,)) for s, p in zip(stored, parts))

    def update(
        self, keys: mx.array, values: mx.array, ctx: StepContext
    ) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...], mx.array]:
        self.keys = self._write(self.keys, keys, ctx.slot)
        self.values = self._write(self.values, values, ctx.slot)
        length = ctx.mask.shape[-1]
        return (
            tuple(_window(a, length) for a in self.keys),
            tuple(_window(a, length) for a in self.values),
            ctx.mask,
        )

    @property
    def state(self) -> list[mx.array]:
        return [*self.keys, *self.values]


def on_cuda() -> bool:
    """Whether MLX computes on an NVIDIA GPU here (a CUDA build, the GPU as the default device)."""
    cuda = getattr(mx, "cuda", None)
    try:
        return bool(cuda is not None and cuda.is_available() and mx.default_device() == mx.gpu)
    except (AttributeError, RuntimeError, ValueError):  # an MLX without these calls has no CUDA backend
        return False


def _window(packed: mx.array, length: int) -> mx.array:
    """The first `length` steps of a packed buffer, for mx.quantized_matmul. MLX's CUDA kernels take no strided
    operand ("No implementation for problem shape"), so there the slice is copied while the window fills."""
    part = packed[:, :, :length]
    return mx.contiguous(part) if length < packed.shape[2] and on_cuda() else part


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

    def __init__(
        self, num_layers: int, batch: int, num_heads: int, head_dim: int, capacity: int, dtype: mx.Dtype,
        kv_bits: int = 16,
    ):
        if kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, got {kv_bits!r}")
        self.capacity = capacity
        self.kv_bits = kv_bits
        if kv_bits == 16:
            self.layers = [RotatingKVCache.allocate(batch, num_heads, head_dim, capacity, dtype) for _ in range(num_layers)]
        else:
            self.layers = [
                QuantizedRotatingKVCache.allocate(batch, num_heads, head_dim, capacity, dtype, kv_bits)
                for _ in range(num_layers)
            ]
        self.position = 0

    def reset(self) -> None:
        # Slots that are not valid are masked out, so old contents need no clearing.
        self.position = 0

    def context(self) -> StepContext:
        return StepContext.for_position(self.position, self.capacity)

    def window_slices(self, length: int) -> list[tuple[list[mx.array], list[mx.array]]]:
        """Copies of each layer's first `length` slots (keys, values), e.g. a prompt's, to put back later.

        Copies, not slices: a slice shares the whole window's buffer, which would keep every window ever
        snapshotted alive (and make the next step's in-place update copy the window).
        """
        return [
            ([mx.contiguous(a[:, :, :length]) for a in _flat(layer.keys)],
             [mx.contiguous(a[:, :, :length]) for a in _flat(layer.values)])
            for layer in self.layers
        ]

    def restore_slices(self, slices: list[tuple[list[mx.array], list[mx.array]]], length: int) -> None:
        """Write `window_slices` back into slots 0..length-1 and continue from position `length`."""
        at = mx.array([0], dtype=mx.int32)
        for layer, (keys, values) in zip(self.layers, slices):
            new_k = [mx.slice_update(a, k, at, axes=(2,)) for a, k in zip(_flat(layer.keys), keys)]
            new_v = [mx.slice_update(a, v, at, axes=(2,)) for a, v in zip(_flat(layer.values), values)]
            quantized = isinstance(layer.keys, tuple)
            layer.keys = tuple(new_k) if quantized else new_k[0]
            layer.values = tuple(new_v) if quantized else new_v[0]
        mx.eval(self.state)
        self.position = length

    @property
    def state(self) -> list[mx.array]:
        return [a for layer in self.layers for a in _flat(layer.keys) + _flat(layer.values)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def _flat(x: mx.array | tuple[mx.array, ...]) -> list[mx.array]:
    return list(x) if isinstance(x, tuple) else [x]


def kv_cache_bytes(num_layers: int, num_heads: int, head_dim: int, capacity: int, kv_bits: int, dtype_bytes: int = 2,
                   batch: int = 1, group_size: int = KV_GROUP_SIZE) -> int:
    """Bytes a TemporalCache of this shape holds (computed, nothing allocated)."""
    elements = 2 * num_layers * batch * num_heads * capacity * head_dim  # keys and values
    if kv_bits == 16:
        return elements * dtype_bytes
    groups = elements // min(group_size, head_dim)
    return elements * kv_bits // 8 + 2 * groups * dtype_bytes  # packed codes + a scale and a bias per group
