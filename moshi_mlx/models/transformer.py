"""Attention, gated feed-forward and the layer stack shared by the temporal transformer and the depformer."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from typing import Protocol

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
        self.head_dim = cfg.head_dim
        self.use_rope = cfg.positional_embedding == "rope"
        self.rope_base = float(cfg.max_period)
        self.scale = cfg.head_dim**-0.5
        self.in_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def __call__(self, x: mx.array, cache: KVCache, ctx: StepContext | None) -> mx.array:
        batch, steps, _ = x.shape
        qkv = self.in_proj(x).reshape(batch, steps, 3, self.num_heads, self.head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.use_rope:
            assert ctx is not None, "rotary embeddings need the step position"
            # Moshi rotates interleaved pairs (x[2i], x[2i+1]): MLX's "traditional" layout.
            q = mx.fast.rope(q, self.head_dim, traditional=True, base=self.rope_base, scale=1.0, offset=ctx.position)
            k = mx.fast.rope(k, self.head_dim, traditional=True, base=self.rope_base, scale=1.0, offset=ctx.position)
        keys, values, mask = cache.update(k, v, ctx)
        if isinstance(keys, tuple):  # a quantized window: (codes, scales, biases)
            out = quantized_attention(q, keys, values, self.scale, mask, cache.bits, cache.group_size)
        else:
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
    """Attention straight from quantized keys/values: two quantized matmuls, nothing dequantized."""
    scores = mx.quantized_matmul(q * scale, *keys, transpose=True, group_size=group_size, bits=bits)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)  # f32 softmax, like SDPA
    return mx.quantized_matmul(weights, *values, transpose=False, group_size=group_size, bits=bits)


class GatedMlp(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.linear_in = nn.Linear(cfg.d_model, 2 * cfg.hidden_dim, bias=False)
        self.linear_out = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(nn.silu(gate) * up)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.gating = GatedMlp(cfg)

    def __call__(self, x: mx.array, cache: KVCache, ctx: StepContext | None) -> mx.array:
        x = x + self.self_attn(self.norm1(x), cache, ctx)
        return x + self.gating(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.layers = [TransformerLayer(cfg) for _ in range(cfg.num_layers)]

    def __call__(self, x: mx.array, caches: list, ctx: StepContext | None = None) -> mx.array:
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache, ctx)
        return x
