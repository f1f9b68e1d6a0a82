"""Attention, gated feed-forward and the layer stack shared by the temporal transformer and the depformer."""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from .cache import StepContext
from .config import TransformerConfig


class KVCache(Protocol):
    def update(
        self, keys: mx.array, values: mx.array, ctx: StepContext | None
    ) -> tuple[mx.array, mx.array, mx.array | None]: ...


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        # Moshi rotates interleaved pairs (x[2i], x[2i+1]): MLX's "traditional" layout; rope_concat rotates halves.
        self.rope = cfg.rope
        self.rope_base = float(cfg.max_period)
        self.scale = cfg.head_dim**-0.5
        # Queries for every head, then keys and values for the key/value heads only (Kyutai's kv_repeat layout).
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_model + 2 * cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def __call__(self, x: mx.array, cache: KVCache, ctx: StepContext | None) -> mx.array:
        batch, steps, _ = x.shape
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = mx.split(self.in_proj(x), [self.num_heads * self.head_dim, x.shape[-1] + kv_width], axis=-1)
        q = q.reshape(batch, steps, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(batch, steps, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(batch, steps, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if self.rope is not None:
            assert ctx is not None, "rotary embeddings need the step position"
            traditional = self.rope == "interleaved"
            q = mx.fast.rope(q, self.head_dim, traditional=traditional, base=self.rope_base, scale=1.0, offset=ctx.position)
            k = mx.fast.rope(k, self.head_dim, traditional=traditional, base=self.rope_base, scale=1.0, offset=ctx.position)
        keys, values, mask = cache.update(k, v, ctx)
        if isinstance(keys, tuple):  # a quantized window: (codes, scales, biases)
            out = quantized_attention(q, keys, values, self.scale, mask, cache.bits, cache.group_size)
        else:  # SDPA pairs query head i with key/value head i // kv_repeat, as Kyutai's repeat does
            out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, steps, -1))


def quantized_attention(
    q: mx.array,
    keys: tuple[mx.array, ...],
    values: tuple[mx.array, ...],
    scale: float,
    mask: mx.array | None,
    bits: int,
    group_size: int,
) -> mx.array:
    """Attention straight from quantized keys/values: two quantized matmuls, nothing dequantized.

    With fewer key/value heads (kv_repeat), each key/value head serves a group of consecutive query heads.
    """
    batch, heads, steps, dim = q.shape
    kv_heads = keys[0].shape[1]
    if kv_heads != heads:
        q = q.reshape(batch, kv_heads, heads // kv_heads, steps, dim)
        keys = tuple(a[:, :, None] for a in keys)
        values = tuple(a[:, :, None] for a in values)
        if mask is not None and mask.ndim == 4:
            mask = mask[:, :, None]
    scores = mx.quantized_matmul(q * scale, *keys, transpose=True, group_size=group_size, bits=bits)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)  # f32 softmax, like SDPA
    out = mx.quantized_matmul(weights, *values, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(batch, heads, steps, -1)


class GatedMlp(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.linear_in = nn.Linear(cfg.d_model, 2 * cfg.hidden_dim, bias=False)
        self.linear_out = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(nn.silu(gate) * up)


class Mlp(nn.Module):
    """Plain feed-forward (Kyutai's gating="none"): linear1, exact GELU, linear2."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.linear2 = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear2(nn.gelu(self.linear1(x)))  # nn.gelu is the exact (erf) form, as PyTorch's F.gelu


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "layer_norm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, affine=True, bias=True)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def sin_embedding(positions: mx.array, dim: int, max_period: float) -> mx.array:
    """Kyutai's sinusoidal positions: [cos(p / max_period^(i / (h - 1))), sin(...)], i < h = dim / 2."""
    half = dim // 2
    freqs = mx.power(mx.array(max_period, dtype=mx.float32), mx.arange(half, dtype=mx.float32) / (half - 1))
    phase = positions.astype(mx.float32)[..., None] / freqs
    return mx.concatenate([mx.cos(phase), mx.sin(phase)], axis=-1)


class LayerScale(nn.Module):
    """Kyutai's learnt per-channel scale on a residual branch (layer_scale_{1,2}.scale)."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.scale = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.scale


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.gating = GatedMlp(cfg) if cfg.gating else Mlp(cfg)
        if cfg.layer_scale:
            self.layer_scale_1 = LayerScale(cfg.d_model)
            self.layer_scale_2 = LayerScale(cfg.d_model)
        self._scaled = cfg.layer_scale

    def __call__(self, x: mx.array, cache: KVCache, ctx: StepContext | None) -> mx.array:
        update = self.self_attn(self.norm1(x), cache, ctx)
        x = x + (self.layer_scale_1(update) if self._scaled else update)
        update = self.gating(self.norm2(x))
        return x + (self.layer_scale_2(update) if self._scaled else update)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.layers = [TransformerLayer(cfg) for _ in range(cfg.num_layers)]
        self._sin_period = cfg.max_period if cfg.sin else None
        self._sin_scale = cfg.positional_scale

    def __call__(self, x: mx.array, caches: list, ctx: StepContext | None = None) -> mx.array:
        if self._sin_period is not None:
            assert ctx is not None, "sinusoidal positions need the step position"
            positions = ctx.position + mx.arange(x.shape[1])
            sin = sin_embedding(positions, x.shape[-1], self._sin_period)
            x = x + (sin if self._sin_scale == 1.0 else self._sin_scale * sin).astype(x.dtype)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache, ctx)
        return x
