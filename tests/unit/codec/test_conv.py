"""The convolutions of the MLX Mimi against direct numpy definitions, and streaming against whole clips."""

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.codec.conv import Conv1d, ConvTranspose1d, elu


def conv_reference(x, w, b, stride, replicate=False):
    """Causal conv by its definition: x [T, in], w [out, in, k] (PyTorch), left pad k - stride."""
    k = w.shape[-1]
    pad = k - stride
    left = np.repeat(x[:1], pad, 0) if replicate else np.zeros((pad, x.shape[1]), x.dtype)
    xp = np.concatenate([left, x])
    frames = (xp.shape[0] - k) // stride + 1
    y = np.stack([sum(xp[t * stride + j] @ w[:, :, j].T for j in range(k)) for t in range(frames)])
    return y + (0 if b is None else b)


def convtr_reference(x, w, b, stride, depthwise=False):
    """Causal transposed conv by its definition: y[t * stride + j] += x[t] W_j, last k - stride cut."""
    k = w.shape[-1]
    out_c = x.shape[1] if depthwise else w.shape[1]
    y = np.zeros(((x.shape[0] - 1) * stride + k, out_c), np.float64)
    for t in range(x.shape[0]):
        for j in range(k):
            y[t * stride + j] += x[t] * w[:, 0, j] if depthwise else x[t] @ w[:, :, j]
    y = y[: y.shape[0] - (k - stride)]
    return y + (0 if b is None else b)


@pytest.mark.parametrize("k,stride,replicate", [(7, 1, False), (3, 1, False), (1, 1, False), (8, 4, False), (4, 2, True)])
def test_conv_matches_its_definition_whole_and_streamed(k, stride, replicate):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((12 * stride, 5)).astype(np.float32)
    w = rng.standard_normal((3, 5, k)).astype(np.float32)
    b = None if replicate else rng.standard_normal(3).astype(np.float32)
    conv = Conv1d("c", w, b, stride, replicate=replicate)
    want = conv_reference(x, w, b, stride, replicate)
    whole = np.array(conv(mx.array(x[None])))[0]
    np.testing.assert_allclose(whole, want, rtol=1e-4, atol=1e-4)
    state = {}
    chunks = [conv.step(mx.array(x[None, i : i + 3 * stride]), state) for i in range(0, x.shape[0], 3 * stride)]
    np.testing.assert_allclose(np.concatenate([np.array(c)[0] for c in chunks]), want, rtol=1e-4, atol=1e-4)


def test_conv_whole_clip_pads_a_partial_last_output():
    """A clip that is not a whole number of strides still gives every output (right padding, as Kyutai's)."""
    w = np.ones((1, 1, 4), np.float32)
    y = np.array(Conv1d("c", w, None, 2)(mx.ones((1, 5, 1))))[0, :, 0]
    np.testing.assert_allclose(y, [2, 4, 3])  # [0 0 1 1] [1 1 1 1] [1 1 1 0]


@pytest.mark.parametrize("k,stride,depthwise", [(16, 8, False), (4, 2, True), (5, 2, False)])
def test_transposed_conv_matches_its_definition_whole_and_streamed(k, stride, depthwise):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((9, 4)).astype(np.float32)
    w = rng.standard_normal((4, 1 if depthwise else 3, k)).astype(np.float32)
    b = None if depthwise else rng.standard_normal(3).astype(np.float32)
    convtr = ConvTranspose1d("t", w, b, stride, depthwise=depthwise)
    want = convtr_reference(x, w, b, stride, depthwise)
    np.testing.assert_allclose(np.array(convtr(mx.array(x[None])))[0], want, rtol=1e-4, atol=1e-4)
    state = {}
    steps = [np.array(convtr.step(mx.array(x[None, i : i + 1]), state))[0] for i in range(x.shape[0])]
    np.testing.assert_allclose(np.concatenate(steps), want, rtol=1e-4, atol=1e-4)


def test_elu_is_exact_to_float32():
    x = np.concatenate([np.linspace(-100, 10, 200_001), [0.0, -1e-8, 1e-8, -87.5, -1e4]]).astype(np.float32)
    got = np.array(elu(mx.array(x))).astype(np.float64)
    want = np.where(x > 0, x, np.expm1(x.astype(np.float64)))
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-7)
