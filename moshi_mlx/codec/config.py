"""Mimi's shape: the values the published checkpoint was trained with (rustymimi has the same built in)."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Codes are in [0, CODEBOOK_SIZE).
CODEBOOK_SIZE = 2048
#: Codebooks in the published checkpoint: one semantic, 31 acoustic.
MAX_CODEBOOKS = 32
#: Positions one transformer query looks back (25 Hz positions: 10 s).
TRANSFORMER_CONTEXT = 250


@dataclass(frozen=True)
class SeanetConfig:
    dimension: int = 512
    channels: int = 1
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder runs them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2

    @property
    def hop(self) -> int:
        """Samples per SEANet output position (960: 25 Hz at 24 kHz)."""
        return math.prod(self.ratios)


@dataclass(frozen=True)
class CodecTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = TRANSFORMER_CONTEXT
    max_period: float = 10_000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = 24_000
    frame_rate: float = 12.5
    seanet: SeanetConfig = SeanetConfig()
    transformer: CodecTransformerConfig = CodecTransformerConfig()
    quantizer_dim: int = 256
    codebook_size: int = CODEBOOK_SIZE
    max_codebooks: int = MAX_CODEBOOKS

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920: 80 ms)."""
        return int(self.sample_rate / self.frame_rate)

    @property
    def downsample_stride(self) -> int:
        """Transformer positions per code frame (2: 25 Hz -> 12.5 Hz)."""
        return self.frame_size // self.seanet.hop
