"""Mimi's split residual vector quantizer: one semantic codebook, then up to 31 acoustic ones.

Both halves read the same 512-dim latent through their own 1x1 projection to 256 dims; each quantizes
its input residually (nearest codebook vector, subtract, next codebook). Decoding sums the two halves'
projections back to 512 dims.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

Tensors = Callable[[str, tuple[int, ...]], np.ndarray]  # (name, expected shape) -> tensor
#: Codebook vectors are embedding_sum / cluster_usage, the usage floored at this.
USAGE_EPSILON = 1e-5


class ResidualQuantizer:
    def __init__(self, get: Tensors, prefix: str, codebooks: int, dim: int, latent: int, bins: int) -> None:
        self.input_proj = mx.array(get(f"{prefix}.input_proj.weight", (dim, latent, 1))[:, :, 0].T.copy())
        self.output_proj = mx.array(get(f"{prefix}.output_proj.weight", (latent, dim, 1))[:, :, 0].T.copy())
        self.embeddings: list[mx.array] = []
        self.half_norms: list[mx.array] = []  # |e|^2 / 2: argmin |x - e|^2 = argmin (|e|^2 / 2 - x.e)
        for i in range(codebooks):
            book = f"{prefix}.vq.layers.{i}._codebook"
            usage = np.maximum(get(f"{book}.cluster_usage", (bins,)), USAGE_EPSILON)
            embedding = (get(f"{book}.embedding_sum", (bins, dim)) / usage[:, None]).astype(np.float32)
            self.embeddings.append(mx.array(embedding))
            self.half_norms.append(mx.array((embedding * embedding).sum(-1) / 2))

    def encode(self, x: mx.array) -> mx.array:
        """[B, T, 512] -> int32 codes [B, T, codebooks]."""
        residual = x @ self.input_proj
        codes = []
        for embedding, half_norm in zip(self.embeddings, self.half_norms):
            index = mx.argmin(half_norm - residual @ embedding.T, axis=-1)
            residual = residual - embedding[index]
            codes.append(index)
        return mx.stack(codes, axis=-1).astype(mx.int32)

    def decode(self, codes: mx.array) -> mx.array:
        """int codes [B, T, codebooks] -> [B, T, 512]."""
        total = None
        for i, embedding in enumerate(self.embeddings):
            part = embedding[codes[..., i]]
            total = part if total is None else total + part
        return total @ self.output_proj


class SplitQuantizer:
    def __init__(self, get: Tensors, codebooks: int, dim: int, latent: int, bins: int, prefix: str = "quantizer") -> None:
        self.codebooks = codebooks
        self.first = ResidualQuantizer(get, f"{prefix}.rvq_first", 1, dim, latent, bins)
        rest = codebooks - 1
        self.rest = ResidualQuantizer(get, f"{prefix}.rvq_rest", rest, dim, latent, bins) if rest else None

    def encode(self, x: mx.array) -> mx.array:
        codes = self.first.encode(x)
        return codes if self.rest is None else mx.concatenate([codes, self.rest.encode(x)], axis=-1)

    def decode(self, codes: mx.array) -> mx.array:
        out = self.first.decode(codes[..., :1])
        return out if self.rest is None else out + self.rest.decode(codes[..., 1:])
