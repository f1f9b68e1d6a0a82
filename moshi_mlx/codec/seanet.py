"""SEANet: Mimi's convolutional encoder (24 kHz -> 25 Hz, 512 channels) and decoder (back).

Built from the checkpoint's tensors (``encoder.model.N...`` / ``decoder.model.N...``), numbered as the
published model numbers its layers: activations take an index too, so convolutions skip numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .config import SeanetConfig
from .conv import Conv1d, ConvTranspose1d, State, elu

Tensors = Callable[[str, tuple[int, ...]], np.ndarray]  # (name, expected shape) -> tensor


def _conv(get: Tensors, prefix: str, in_c: int, out_c: int, kernel: int, stride: int = 1) -> Conv1d:
    weight = get(f"{prefix}.conv.conv.weight", (out_c, in_c, kernel))
    return Conv1d(prefix, weight, get(f"{prefix}.conv.conv.bias", (out_c,)), stride)


class ResidualBlock:
    """x + conv_1x1(elu(conv_k(elu(x)))): the skip is the identity (true_skip)."""

    def __init__(self, get: Tensors, prefix: str, dim: int, cfg: SeanetConfig) -> None:
        hidden = dim // cfg.compress
        self.first = _conv(get, f"{prefix}.block.1", dim, hidden, cfg.residual_kernel_size)
        self.second = _conv(get, f"{prefix}.block.3", hidden, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.second(elu(self.first(elu(x))))

    def step(self, x: mx.array, state: State) -> mx.array:
        return x + self.second.step(elu(self.first.step(elu(x), state)), state)


class SeanetEncoder:
    def __init__(self, cfg: SeanetConfig, get: Tensors, prefix: str = "encoder.model") -> None:
        if cfg.n_residual_layers != 1:
            raise ValueError("only one residual block per stage is supported")
        dim = cfg.n_filters
        self.first = _conv(get, f"{prefix}.0", cfg.channels, dim, cfg.kernel_size)
        self.stages: list[tuple[ResidualBlock, Conv1d]] = []
        index = 1
        for ratio in reversed(cfg.ratios):
            block = ResidualBlock(get, f"{prefix}.{index}", dim, cfg)
            down = _conv(get, f"{prefix}.{index + 2}", dim, 2 * dim, 2 * ratio, stride=ratio)
            self.stages.append((block, down))
            index += 3  # block, activation, convolution
            dim *= 2
        self.last = _conv(get, f"{prefix}.{index + 1}", dim, cfg.dimension, cfg.last_kernel_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.first(x)
        for block, down in self.stages:
            x = down(elu(block(x)))
        return self.last(elu(x))

    def step(self, x: mx.array, state: State) -> mx.array:
        x = self.first.step(x, state)
        for block, down in self.stages:
            x = down.step(elu(block.step(x, state)), state)
        return self.last.step(elu(x), state)


class SeanetDecoder:
    def __init__(self, cfg: SeanetConfig, get: Tensors, prefix: str = "decoder.model") -> None:
        if cfg.n_residual_layers != 1:
            raise ValueError("only one residual block per stage is supported")
        dim = cfg.n_filters * 2 ** len(cfg.ratios)
        self.first = _conv(get, f"{prefix}.0", cfg.dimension, dim, cfg.kernel_size)
        self.stages: list[tuple[ConvTranspose1d, ResidualBlock]] = []
        index = 1
        for ratio in cfg.ratios:
            name = f"{prefix}.{index + 1}"
            weight = get(f"{name}.convtr.convtr.weight", (dim, dim // 2, 2 * ratio))
            up = ConvTranspose1d(name, weight, get(f"{name}.convtr.convtr.bias", (dim // 2,)), ratio)
            dim //= 2
            self.stages.append((up, ResidualBlock(get, f"{prefix}.{index + 2}", dim, cfg)))
            index += 3  # activation, transposed convolution, block
        self.last = _conv(get, f"{prefix}.{index + 1}", dim, cfg.channels, cfg.last_kernel_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.first(x)
        for up, block in self.stages:
            x = block(up(elu(x)))
        return self.last(elu(x))

    def step(self, x: mx.array, state: State) -> mx.array:
        x = self.first.step(x, state)
        for up, block in self.stages:
            x = block.step(up.step(elu(x), state), state)
        return self.last.step(elu(x), state)
