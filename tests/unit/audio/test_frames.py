"""moshi_mlx.audio.frames: the audio format defined once, and the one re-chunker."""

import subprocess
import sys

import numpy as np
import pytest

from moshi_mlx.audio import frames
from moshi_mlx.audio.frames import FrameChunker


def test_format_is_derived_from_mimis_two_facts():
    assert (frames.SAMPLE_RATE, frames.FRAME_RATE) == (24_000, 12.5)
    assert frames.FRAME_SIZE == 1920 and frames.FRAME_MS == 80.0 and frames.FRAMES_PER_MINUTE == 750


def test_wire_protocol_and_settings_import_no_mlx_and_no_engine():
    """A client machine can speak the protocol without MLX: the package's __init__ is lazy too."""
    code = (
        "import sys, moshi_mlx.net.protocol, moshi_mlx.audio.frames, moshi_mlx.settings, moshi_mlx.net.remote; "
        "bad = sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.') or m == 'moshi_mlx.engine'); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_frame_chunker_rechunks_arbitrary_sizes():
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(1920 * 5 + 123).astype(np.float32)
    chunker = FrameChunker()
    frames, pos = [], 0
    for size in [1, 959, 960, 2000, 7, 3840, 1500, 0, 2356]:
        frames += chunker.push(signal[pos : pos + size])
        pos += size
    frames += chunker.push(signal[pos:])
    assert all(f.shape == (1920,) and f.dtype == np.float32 for f in frames)
    assert len(frames) == 5 and chunker.pending == 123
    np.testing.assert_array_equal(np.concatenate(frames), signal[: 1920 * 5])
    np.testing.assert_array_equal(chunker.rest(), signal[1920 * 5 :])  # the end of the stream, handed over
    assert chunker.pending == 0 and chunker.rest().size == 0
    chunker.push(signal[:7])
    chunker.reset()
    assert chunker.pending == 0
    assert chunker.push(np.zeros(0, np.float32)) == []


def test_frame_chunker_copies_input():
    chunker = FrameChunker(4)
    data = np.arange(8, dtype=np.float32)
    out = chunker.push(data)
    data[:] = -1
    np.testing.assert_array_equal(np.concatenate(out), np.arange(8, dtype=np.float32))
    with pytest.raises(ValueError):
        FrameChunker(0)
