"""The Moshi language model: embeddings, temporal transformer, depformer and heads.

Parameter names match the published MLX checkpoints (kyutai/moshi{ko,ka}-mlx-*) exactly.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..sampling import Sampler
from .cache import FrameCache, RotatingKVCache, StepContext, TemporalCache
from .config import LmConfig
from .transformer import Transformer

# Token id meaning "this stream has no token here yet": it embeds to exact zeros.
NO_TOKEN = -1


def embed(table: nn.Module, tokens: mx.array) -> mx.array:
    """Embedding lookup where NO_TOKEN gives a zero vector.

    Works for nn.Embedding and nn.QuantizedEmbedding alike (a quantized table would
    otherwise return its last row for index -1).
    """
    present = tokens >= 0
    vectors = table(mx.maximum(tokens, 0))
    return vectors * present[..., None].astype(vectors.dtype)


class DepformerSlice(nn.Module):
    """Weights for one generated codebook of the depth transformer."""

    def __init__(self, cfg: LmConfig, in_vocab_size: int) -> None:
        super().__init__()
        dep = cfg.depformer
        self.emb = nn.Embedding(in_vocab_size, dep.d_model)
        self.linear_in = nn.Linear(cfg.transformer.d_model, dep.d_model, bias=False)
        self.transformer = Transformer(dep)
        self.linear_out = nn.Linear(dep.d_model, cfg.audio_card, bias=False)


class Depformer(nn.Module):
    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        # Slice 0 reads the text token just sampled; slice k reads audio codebook k-1.
        self.slices = [
            DepformerSlice(cfg, cfg.text_in_vocab_size if k == 0 else cfg.audio_vocab_size)
            for k in range(cfg.generated_codebooks)
        ]

    def sample(self, hidden: mx.array, text_token: mx.array, sampler: Sampler, keys: mx.array) -> mx.array:
        """Sample the generated codebooks one after another; returns [B, K] int32.

        Stays on device: each sampled code feeds the next slice without a host sync.
        """
        caches = [FrameCache() for _ in self.slices[0].transformer.layers]
        previous = text_token
        codes = []
        for k, piece in enumerate(self.slices):
            x = piece.linear_in(hidden) + embed(piece.emb, previous[:, None])
            x = piece.transformer(x, caches)
            logits = piece.linear_out(x)[:, 0, :]
            previous = sampler(logits, keys[k])
            codes.append(previous)
        return mx.stack(codes, axis=1)


class Lm(nn.Module):
    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.transformer.d_model
        self.text_emb = nn.Embedding(cfg.text_in_vocab_size, dim)
        self.audio_embs = [nn.Embedding(cfg.audio_vocab_size, dim) for _ in range(cfg.audio_codebooks)]
        self.transformer = Transformer(cfg.transformer)
        self.out_norm = nn.RMSNorm(dim, eps=cfg.transformer.norm_eps)
        self.text_linear = nn.Linear(dim, cfg.text_out_vocab_size, bias=False)
        self.depformer = Depformer(cfg)

    @property
    def dtype(self) -> mx.Dtype:
        return self.out_norm.weight.dtype

    def make_cache(self, batch: int = 1, kv_bits: int = 16, context: int | None = None) -> TemporalCache:
        """The temporal transformer's KV windows, allocated once per session.

        kv_bits: 16 keeps keys/values in the model's dtype; 8 or 4 stores them quantized.
        context: a shorter window than the checkpoint's (to fit a memory budget).
        """
        t = self.config.transformer
        window = t.context if context is None else min(int(context), t.context)
        return TemporalCache(t.num_layers, batch, t.num_heads, t.head_dim, window, self.dtype, kv_bits)

    def temporal(
        self, tokens: mx.array, caches: list[RotatingKVCache], ctx: StepContext
    ) -> tuple[mx.array, mx.array]:
        """One step of the temporal transformer.

        tokens: [B, 1 + audio_codebooks] int32 (text first), NO_TOKEN where a stream is empty.
        Returns (normalised hidden state [B, 1, D], text logits [B, text_out_vocab]).
        """
        x = embed(self.text_emb, tokens[:, :1])
        for k, table in enumerate(self.audio_embs):
            x = x + embed(table, tokens[:, k + 1 : k + 2])
        hidden = self.out_norm(self.transformer(x, caches, ctx))
        return hidden, self.text_linear(hidden)[:, 0, :]
