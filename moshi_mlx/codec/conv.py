"""Causal 1-D convolutions and transposed convolutions, whole-clip and streaming.

Layout is MLX's: [batch, time, channels]. Weights arrive in PyTorch's layout (conv [out, in, k], transposed
conv [in, out / groups, k]) and are rearranged once, for one matrix product per call.

Streaming state is a plain dict (name -> array) owned by the caller, so one set of weights serves any
number of independent streams. A convolution keeps its last ``kernel - stride`` inputs; a transposed
convolution keeps the ``kernel - stride`` output samples that the next input still adds to.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

State = dict[str, mx.array]


_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 in two parts: r = x - n ln2 stays exact
_EXP_TAYLOR = (1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0)  # after 1 / 5040


def _exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for x <= 0 to float32 rounding (relative error < 1e-7), from multiplies and adds only.

    Why: MLX's CPU build on Linux evaluates exp one value at a time (measured 4x slower than this, fused),
    and the ELUs are a tenth of Mimi's time there. x = n ln2 + r with |r| <= ln2 / 2; exp(r) by its Taylor
    series to r^7; 2^n by writing n straight into the float's exponent bits.
    """
    x = mx.maximum(x, -87.0)  # 2^-126 is float32's smallest normal
    n = mx.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = mx.array(1 / 5040, mx.float32)
    for c in _EXP_TAYLOR:
        p = p * r + c
    return p * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)


@mx.compile
def elu(x: mx.array) -> mx.array:
    """ELU with alpha 1 (exp only of the negative part, so it never overflows)."""
    return mx.where(x > 0, x, _exp_nonpositive(mx.minimum(x, 0.0)) - 1.0)


class Conv1d:
    """A causal convolution: ``kernel - stride`` samples of left padding, zeros or the first sample repeated."""

    def __init__(self, name: str, weight: np.ndarray, bias: np.ndarray | None, stride: int = 1, replicate: bool = False):
        out_c, in_c, kernel = weight.shape
        if kernel < stride:
            raise ValueError(f"{name}: kernel {kernel} is shorter than its stride {stride}")
        self.name, self.stride, self.kernel, self.replicate = name, stride, kernel, replicate
        self.in_c, self.out_c = in_c, out_c
        # [out, in, k] -> [k * in, out]: the im2col columns below are ordered tap by tap
        self.weight = mx.array(np.ascontiguousarray(weight.transpose(2, 1, 0).reshape(kernel * in_c, out_c)))
        self.bias = None if bias is None else mx.array(bias)

    @property
    def padding(self) -> int:
        return self.kernel - self.stride

    def _apply(self, x: mx.array) -> mx.array:
        """Valid convolution of an already padded [B, T, C] input."""
        frames = (x.shape[1] - self.kernel) // self.stride + 1
        last = (frames - 1) * self.stride + 1
        if self.kernel == 1:
            cols = x[:, :last:self.stride]
        else:
            cols = mx.concatenate([x[:, k : k + last : self.stride] for k in range(self.kernel)], axis=-1)
        y = cols @ self.weight
        return y if self.bias is None else y + self.bias

    def _left_pad(self, x: mx.array) -> mx.array:
        if not self.padding:
            return x
        if self.replicate:
            pad = mx.repeat(x[:, :1], self.padding, axis=1)
        else:
            pad = mx.zeros((x.shape[0], self.padding, x.shape[2]), x.dtype)
        return mx.concatenate([pad, x], axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        """Whole clip: left padding, and right padding up to a whole last output (as the reference does)."""
        length = x.shape[1]
        frames = -(-max(length + self.padding - self.kernel, 0) // self.stride) + 1
        extra = max((frames - 1) * self.stride + self.kernel - self.padding - length, 0)
        x = self._left_pad(x)
        if extra:
            x = mx.concatenate([x, mx.zeros((x.shape[0], extra, x.shape[2]), x.dtype)], axis=1)
        return self._apply(x)

    def step(self, x: mx.array, state: State) -> mx.array:
        """Streaming: ``x`` must complete at least one output (a whole number of strides once started)."""
        prev = state.get(self.name)
        x = self._left_pad(x) if prev is None else mx.concatenate([prev, x], axis=1)
        frames = (x.shape[1] - self.kernel) // self.stride + 1
        if frames < 1:
            raise ValueError(f"{self.name}: a streaming step must give at least one output")
        state[self.name] = x[:, frames * self.stride :]
        return self._apply(x[:, : (frames - 1) * self.stride + self.kernel])


class ConvTranspose1d:
    """A causal transposed convolution (the last ``kernel - stride`` outputs of a clip are cut).

    ``depthwise``: one filter per channel (groups == channels), PyTorch weight [channels, 1, k].
    """

    def __init__(self, name: str, weight: np.ndarray, bias: np.ndarray | None, stride: int, depthwise: bool = False):
        in_c, out_per_group, kernel = weight.shape
        self.name, self.stride, self.kernel, self.depthwise = name, stride, kernel, depthwise
        self.out_c = in_c if depthwise else out_per_group
        self.taps = -(-kernel // stride)  # kernel in whole strides; the rest of the last one is zero
        padded = np.zeros((in_c, out_per_group, self.taps * stride), np.float32)
        padded[..., :kernel] = weight
        if depthwise:
            self.weight = mx.array(padded[:, 0])  # [C, taps * stride]
        else:
            self.weight = mx.array(padded.reshape(in_c, -1))  # [in, out * taps * stride]
        self.bias = None if bias is None else mx.array(bias)

    @property
    def padding(self) -> int:
        return self.kernel - self.stride

    def _raw(self, x: mx.array) -> mx.array:
        """Full transposed convolution without bias: [B, T, in] -> [B, (T - 1) * stride + kernel, out]."""
        b, t, _ = x.shape
        s, taps = self.stride, self.taps
        if self.depthwise:
            y = x[..., None] * self.weight  # [B, T, C, taps * s]
        else:
            y = (x @ self.weight).reshape(b, t, self.out_c, taps * s)
        y = y.reshape(b, t, self.out_c, taps, s).transpose(0, 1, 3, 4, 2)  # [B, T, taps, s, C]
        out = None
        for i in range(taps):  # tap i of input t lands on output chunk t + i
            part = mx.pad(y[:, :, i], [(0, 0), (i, taps - 1 - i), (0, 0), (0, 0)])
            out = part if out is None else out + part
        out = out.reshape(b, (t + taps - 1) * s, self.out_c)
        return out[:, : (t - 1) * s + self.kernel]

    def __call__(self, x: mx.array) -> mx.array:
        y = self._raw(x)
        y = y[:, : y.shape[1] - self.padding]
        return y if self.bias is None else y + self.bias

    def step(self, x: mx.array, state: State) -> mx.array:
        y = self._raw(x)
        prev = state.get(self.name)
        if prev is not None:
            y = mx.concatenate([y[:, : prev.shape[1]] + prev, y[:, prev.shape[1] :]], axis=1)
        ready = x.shape[1] * self.stride
        state[self.name] = y[:, ready:]
        y = y[:, :ready]
        return y if self.bias is None else y + self.bias
