"""SEANet: Mimi's convolutional encoder (24 kHz -> 25 Hz, 512 channels) and decoder (back).

Built from the checkpoint's tensors (``encoder.model.N...`` / ``decoder.model.N...``), numbered as the
published model numbers its layers: activations take an index too, so convolutions skip numbers.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from .config import SeanetConfig
from .conv import Conv1d, ConvTranspose1d, State, elu

Tensors = Callable[[str], np.ndarray]  # name -> tensor, raising KeyError with the name when absent


def _conv(get: Tensors, prefix: str, stride: int = 1) -> Conv1d:
    return Conv1d(prefix, get(f"{prefix}.conv.conv.weight"), get(f"{prefix}.conv.conv.bias"), stride)


class ResidualBlock:
    """x + conv_1x1(elu(conv_k(elu(x)))): the skip is the identity (true_skip)."""

    def __init__(self, get: Tensors, prefix: str) -> None:
        self.first = _conv(get, f"{prefix}.block.1")
        self.second = _conv(get, f"{prefix}.block.3")

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.second(elu(self.first(elu(x))))

    def step(self, x: mx.array, state: State) -> mx.array:
        return x + self.second.step(elu(self.first.step(elu(x), state)), state)


class SeanetEncoder:
    def __init__(self, cfg: SeanetConfig, get: Tensors, prefix: str = "encoder.model") -> None:
        if cfg.n_residual_layers != 1:
            raise ValueError("only one residual block per stage is supported")
        self.first = _conv(get, f"{prefix}.0")
        self.stages: list[tuple[ResidualBlock, Conv1d]] = []
        index = 1
        for ratio in reversed(cfg.ratios):
            block = ResidualBlock(get, f"{prefix}.{index}")
            down = _conv(get, f"{prefix}.{index + 2}", stride=ratio)
            self.stages.append((block, down))
            index += 3  # block, activation, convolution
        self.last = _conv(get, f"{prefix}.{index + 1}")

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
        self.first = _conv(get, f"{prefix}.0")
        self.stages: list[tuple[ConvTranspose1d, ResidualBlock]] = []
        index = 1
        for ratio in cfg.ratios:
            up_name = f"{prefix}.{index + 1}"
            up = ConvTranspose1d(
                up_name, get(f"{up_name}.convtr.convtr.weight"), get(f"{up_name}.convtr.convtr.bias"), ratio
            )
            self.stages.append((up, ResidualBlock(get, f"{prefix}.{index + 2}")))
            index += 3  # activation, transposed convolution, block
        self.last = _conv(get, f"{prefix}.{index + 1}")

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
