"""Integrated loudness (ITU-R BS.1770, LUFS) of mono audio, and normalising to a target, in numpy alone.

NVIDIA's PersonaPlex brings a voice prompt to -24 LUFS with pyloudnorm before Mimi encodes it; this measures
the same quantity: K-weighting (a high shelf then a high pass, designed for the file's rate), mean square over
400 ms blocks every 100 ms, an absolute gate at -70 LUFS and a relative gate 10 LU under the gated mean.
The IIR filters run in the frequency domain on a zero-padded copy (no scipy needed); their tails die out
well within the padding, so this is the filters' linear output to float rounding.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK_S = 0.4  # gating block length
BLOCK_STEP = 0.25  # blocks overlap by 75 %
ABSOLUTE_GATE = -70.0  # LUFS
RELATIVE_GATE = -10.0  # LU under the absolute-gated loudness
OFFSET = -0.691  # BS.1770's constant
PAD_S = 1.0  # zero padding for the frequency-domain filtering: the 38 Hz high pass rings for far less


def _biquad(kind: str, gain_db: float, q: float, fc: float, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) of one K-weighting stage (the standard audio-EQ biquad forms)."""
    a_gain = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * fc / rate
    alpha = math.sin(w0) / (2 * q)
    cos = math.cos(w0)
    if kind == "high_shelf":
        s = 2 * math.sqrt(a_gain) * alpha
        b = [a_gain * ((a_gain + 1) + (a_gain - 1) * cos + s), -2 * a_gain * ((a_gain - 1) + (a_gain + 1) * cos),
             a_gain * ((a_gain + 1) + (a_gain - 1) * cos - s)]
        a = [(a_gain + 1) - (a_gain - 1) * cos + s, 2 * ((a_gain - 1) - (a_gain + 1) * cos),
             (a_gain + 1) - (a_gain - 1) * cos - s]
    else:  # high_pass
        b = [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2]
        a = [1 + alpha, -2 * cos, 1 - alpha]
    return np.array(b) / a[0], np.array(a) / a[0]


def k_weighted(pcm: np.ndarray, rate: int) -> np.ndarray:
    """`pcm` through BS.1770's K-weighting filters."""
    n = pcm.shape[0] + int(PAD_S * rate)
    size = 1 << (n - 1).bit_length()
    z = np.exp(-1j * 2 * np.pi * np.fft.rfftfreq(size))  # z^-1 on the unit circle
    response = np.ones_like(z)
    for b, a in (_biquad("high_shelf", 4.0, 1 / math.sqrt(2), 1500.0, rate), _biquad("high_pass", 0.0, 0.5, 38.0, rate)):
        response *= (b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z)
    return np.fft.irfft(np.fft.rfft(pcm.astype(np.float64), size) * response, size)[: pcm.shape[0]]


def integrated_loudness(pcm: np.ndarray, rate: int) -> float:
    """Loudness of mono `pcm` in LUFS; -inf for silence or audio shorter than one block."""
    pcm = np.asarray(pcm, dtype=np.float64).reshape(-1)
    block = BLOCK_S * rate
    blocks = round((pcm.shape[0] / rate - BLOCK_S) / (BLOCK_S * BLOCK_STEP)) + 1
    if pcm.shape[0] < block or blocks < 1:
        return -math.inf
    weighted = k_weighted(pcm, rate)
    power = np.array([
        np.mean(weighted[int(block * j * BLOCK_STEP): int(block * (j * BLOCK_STEP + 1))] ** 2) for j in range(blocks)
    ])
    with np.errstate(divide="ignore"):
        levels = OFFSET + 10 * np.log10(power)
    kept = levels >= ABSOLUTE_GATE
    if not kept.any():
        return -math.inf
    relative = OFFSET + 10 * math.log10(power[kept].mean()) + RELATIVE_GATE
    kept = (levels > relative) & (levels > ABSOLUTE_GATE)
    if not kept.any():
        return -math.inf
    return OFFSET + 10 * math.log10(power[kept].mean())


def normalise(pcm: np.ndarray, rate: int, target_lufs: float) -> np.ndarray:
    """`pcm` scaled to `target_lufs` (float32); silence or a sub-block clip is returned unchanged."""
    loudness = integrated_loudness(pcm, rate)
    if not math.isfinite(loudness):
        return np.asarray(pcm, dtype=np.float32)
    return (np.asarray(pcm, dtype=np.float64) * 10 ** ((target_lufs - loudness) / 20)).astype(np.float32)
