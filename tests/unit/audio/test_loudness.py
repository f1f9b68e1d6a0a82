"""BS.1770 integrated loudness in numpy (what pyloudnorm measures before NVIDIA's -24 LUFS normalisation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moshi_mlx.audio.loudness import integrated_loudness, normalise


@pytest.mark.parametrize("rate", [48_000, 24_000])
def test_a_full_scale_1khz_sine_reads_minus_3_lufs(rate):
    # BS.1770's calibration: K-weighting is ~0 dB at 1 kHz, a 0 dBFS sine has mean square 1/2 -> -3.01 LUFS.
    t = np.arange(rate * 3) / rate
    assert integrated_loudness(np.sin(2 * np.pi * 1000 * t), rate) == pytest.approx(-3.01, abs=0.05)


def test_gating_ignores_silence_and_normalise_hits_the_target():
    rate = 24_000
    t = np.arange(rate * 2) / rate
    tone = 0.1 * np.sin(2 * np.pi * 500 * t)
    padded = np.concatenate([tone, np.zeros(rate * 2)])
    # Ungated, 2 s of silence would take 3 dB off; the gates drop the silent blocks (the few straddling the
    # tone's end stay, as BS.1770 has it).
    assert integrated_loudness(padded, rate) == pytest.approx(integrated_loudness(tone, rate), abs=0.5)
    assert integrated_loudness(normalise(padded, rate, -24.0), rate) == pytest.approx(-24.0, abs=0.01)


def test_silence_and_short_clips_are_left_alone():
    assert integrated_loudness(np.zeros(48_000), 24_000) == -math.inf
    short = np.full(100, 0.3, np.float32)
    assert np.array_equal(normalise(short, 24_000, -24.0), short)


def test_readings_equal_pyloudnorms():
    """tests/fixtures/personaplex/loudness.json: pyloudnorm's readings (NVIDIA normalises voices with it) of
    the signals its make_loudness.py draws from a seed."""
    import importlib.util
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "fixtures" / "personaplex"
    spec = importlib.util.spec_from_file_location("make_loudness", folder / "make_loudness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy only at import
    reference = json.loads((folder / "loudness.json").read_text())
    for name, pcm in module.signals().items():
        assert integrated_loudness(pcm, module.RATE) == pytest.approx(reference[name], abs=1e-6), name
