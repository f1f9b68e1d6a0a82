"""Mimi's two transformers (encoder side and decoder side): 8 pre-norm layers, RoPE, a 250-position window.

Each query sees itself and the ``context`` positions before it (251 keys, as rustymimi computes it).
Streaming keeps keys and values in a rotating window of ``context + step`` slots per layer: a stream's
memory is fixed from its first step on, whatever its length. Positions stay small too: rotary angles are
position x frequency in float32, which would lose precision after days; since attention only sees position
differences, every ``REBASE_POSITIONS`` the stream's positions move back by that much, its cached keys rotated
back to match (exact up to float rounding, and those keys leave the window within 10 s anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .config import CodecTransformerConfig

Tensors = Callable[[str, tuple[int, ...]], np.ndarray]  # (name, expected shape) -> tensor
#: Positions after which a stream's positions move back by this much (2^16 at 25 Hz: 44 minutes).
REBASE_POSITIONS = 1 << 16


def _layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, weight, bias, eps)


@dataclass
class Window:
    """One stream's keys and values: ``slots`` positions per layer, reused in turn."""

    slots: int
    keys: list[mx.array] = field(default_factory=list)
    values: list[mx.array] = field(default_factory=list)
    slot_position: np.ndarray = field(init=False)  # absolute position held by each slot, -1: empty
    offset: int = 0  # positions seen so far, less ``rebased``
    rebased: int = 0  # positions the stream has been moved back by (see REBASE_POSITIONS)

    def __post_init__(self) -> None:
        self.slot_position = np.full(self.slots, -1, np.int64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.keys, *self.values))


class Layer:
    def __init__(self, cfg: CodecTransformerConfig, get: Tensors, prefix: str) -> None:
        self.cfg = cfg
        d, f = cfg.d_model, cfg.dim_feedforward

        def w(name: str, *shape: int) -> mx.array:
            return mx.array(np.ascontiguousarray(get(f"{prefix}.{name}", shape)))

        def linear(name: str, out_dim: int, in_dim: int) -> mx.array:
            # stored [in, out], contiguous: x @ W runs 1.5x faster than x @ W.T on MLX's CPU (measured)
            return mx.array(np.ascontiguousarray(get(f"{prefix}.{name}", (out_dim, in_dim)).T))

        self.in_proj = linear("self_attn.in_proj_weight", 3 * d, d)
        self.out_proj = linear("self_attn.out_proj.weight", d, d)
        self.norm1 = (w("norm1.weight", d), w("norm1.bias", d))
        self.norm2 = (w("norm2.weight", d), w("norm2.bias", d))
        self.linear1 = linear("linear1.weight", f, d)
        self.linear2 = linear("linear2.weight", d, f)
        self.scale1 = w("layer_scale_1.scale", d)
        self.scale2 = w("layer_scale_2.scale", d)

    def _qkv(self, x: mx.array, offset: int) -> tuple[mx.array, mx.array, mx.array]:
        cfg = self.cfg
        b, t, _ = x.shape
        h = _layer_norm(x, *self.norm1, cfg.norm_eps)
        qkv = (h @ self.in_proj).reshape(b, t, 3, cfg.num_heads, cfg.head_dim).transpose(2, 0, 3, 1, 4)
        # Mimi rotates interleaved pairs (x[2i], x[2i+1]): MLX's "traditional" layout
        rope = lambda a: mx.fast.rope(
            a, cfg.head_dim, traditional=True, base=cfg.max_period, scale=1.0, offset=offset
        )
        return rope(qkv[0]), rope(qkv[1]), qkv[2]

    def _finish(self, x: mx.array, attended: mx.array) -> mx.array:
        b, _, t, _ = attended.shape
        x = x + self.scale1 * (attended.transpose(0, 2, 1, 3).reshape(b, t, -1) @ self.out_proj)
        h = _layer_norm(x, *self.norm2, self.cfg.norm_eps)
        return x + self.scale2 * (_gelu(h @ self.linear1) @ self.linear2)

    def __call__(self, x: mx.array, mask: mx.array, offset: int = 0) -> mx.array:
        q, k, v = self._qkv(x, offset)
        return self._finish(x, _attend(q, k, v, mask, self.cfg.head_dim))

    def step(self, x: mx.array, mask: mx.array, window: Window, index: int, slots: list[slice]) -> mx.array:
        q, k, v = self._qkv(x, window.offset)
        keys, values = window.keys[index], window.values[index]
        done = 0
        for part in slots:  # one slice, or two where the step wraps around the window
            n = part.stop - part.start
            keys[:, :, part] = k[:, :, done : done + n]
            values[:, :, part] = v[:, :, done : done + n]
            done += n
        window.keys[index], window.values[index] = keys, values
        return self._finish(x, _attend(q, keys, values, mask, self.cfg.head_dim))


def _gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU."""
    return 0.5 * x * (1.0 + mx.erf(x * 0.7071067811865476))


@mx.compile  # fused: about 10 % off a streaming step on MLX's CPU (measured)
def _attend(q: mx.array, k: mx.array, v: mx.array, mask: mx.array, head_dim: int) -> mx.array:
    scores = (q @ k.transpose(0, 1, 3, 2)) * (head_dim**-0.5) + mask
    return mx.softmax(scores, axis=-1) @ v


class CodecTransformer:
    """The layer stack; input and output [B, T, d_model] (the checkpoint has no projections around it)."""

    def __init__(self, cfg: CodecTransformerConfig, get: Tensors, prefix: str) -> None:
        self.cfg = cfg
        self.layers = [Layer(cfg, get, f"{prefix}.transformer.layers.{i}") for i in range(cfg.num_layers)]

    def _allowed(self, queries: np.ndarray, keys: np.ndarray) -> mx.array:
        """Additive mask: a query sees keys from ``context`` positions back up to itself."""
        delta = queries[:, None] - keys[None, :]
        ok = (keys[None, :] >= 0) & (delta >= 0) & (delta <= self.cfg.context)
        return mx.array(np.where(ok, 0.0, -np.inf).astype(np.float32))

    def __call__(self, x: mx.array) -> mx.array:
        """A whole clip from position 0."""
        positions = np.arange(x.shape[1])
        mask = self._allowed(positions, positions)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def new_window(self, batch: int, step_positions: int, dtype: mx.Dtype = mx.float32, position: int = 0) -> Window:
        """An empty window whose first step is at ``position`` (0 normally; later ones let a test reach the
        positions' move back, at ``2 * REBASE_POSITIONS``, without hours of audio first)."""
        if position < 0:
            raise ValueError(f"a stream's start position must be >= 0, got {position}")
        cfg = self.cfg
        window = Window(cfg.context + step_positions, offset=position)
        shape = (batch, cfg.num_heads, window.slots, cfg.head_dim)
        window.keys = [mx.zeros(shape, dtype) for _ in self.layers]
        window.values = [mx.zeros(shape, dtype) for _ in self.layers]
        return window

    def _rebase(self, window: Window, shift: int) -> None:
        """Move the stream's positions back by ``shift``: keys rotate by -shift (one rotation for all slots)."""
        cfg = self.cfg
        for i, keys in enumerate(window.keys):
            b, h, n, d = keys.shape
            back = mx.fast.rope(
                keys.reshape(b, h * n, 1, d), d, traditional=True, base=cfg.max_period, scale=1.0, offset=-shift
            )
            window.keys[i] = back.reshape(b, h, n, d)
        filled = window.slot_position >= 0
        window.slot_position[filled] -= shift
        window.offset -= shift
        window.rebased += shift

    def step(self, x: mx.array, window: Window, rebase_every: int = REBASE_POSITIONS) -> mx.array:
        if window.offset >= 2 * rebase_every:  # every slot then holds a position >= rebase_every - slots
            self._rebase(window, rebase_every)
        t = x.shape[1]
        if t + self.cfg.context > window.slots:
            raise ValueError(f"a step of {t} positions does not fit a window of {window.slots} slots")
        start = window.offset % window.slots
        first = min(t, window.slots - start)
        slots = [slice(start, start + first)] + ([slice(0, t - first)] if first < t else [])
        positions = window.offset + np.arange(t)
        window.slot_position[(start + np.arange(t)) % window.slots] = positions
        mask = self._allowed(positions, window.slot_position)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, mask, window, i, slots)
        window.offset += t
        return x
