"""The MLX Mimi against rustymimi on the same random weights, over 30 s of espeak-ng speech.

Goals (issue 24): codes agree per codebook (semantic >= 99 %, every codebook >= 97 %); decoding the same
codes, the MLX Mimi's audio is within 40 dB SNR of rustymimi's; streaming gives the same codes as the whole
clip, past the point where the transformers' window has wrapped around (10 s).

By hand (`MOSHI_MLX_LONG_TESTS=1 python -m pytest -q tests/e2e/test_mimi_parity.py`, about 3 minutes here: MLX's
Linux CPU wheel uses the reference BLAS): CI runs the same three checks on a shorter clip in
tests/unit/audio/test_mlx_mimi.py and tests/unit/codec/.
"""

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.audio.frames import FRAME_SIZE
from moshi_mlx.audio.mlx_mimi import MlxMimi
from moshi_mlx.codec.network import MimiNetwork
from tests.helpers.audio_env import SPEECH_TOOLS, missing
from tests.helpers.mimi_signals import agreement, long_speech, snr_db

pytestmark = pytest.mark.long

SECONDS = 30
FRAMES = SECONDS * 25 // 2


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if missing(*SPEECH_TOOLS):
        pytest.skip(f"needs {', '.join(missing(*SPEECH_TOOLS))} for test speech")
    x = long_speech(tmp_path_factory.mktemp("speech") / "speech.wav", SECONDS)
    return x[: FRAMES * FRAME_SIZE]


@pytest.fixture(scope="module")
def net(mimi_path):
    return MimiNetwork.load(mimi_path, 8)


@pytest.fixture(scope="module")
def whole_codes(net, speech):
    """The MLX Mimi's codes of the whole 30 s clip in one call."""
    return np.array(net.encode(mx.array(speech[None])))[0]


@pytest.fixture(scope="module")
def rust_codes(mimi_path, speech):
    rustymimi = pytest.importorskip("rustymimi", reason="rustymimi is not installed: nothing to compare with")
    return rustymimi.Tokenizer(str(mimi_path), num_codebooks=8).encode(speech.reshape(1, 1, -1).copy())[0]


@pytest.mark.timeout(1800)  # whole clips of 30 s on a small shared CPU: minutes each
def test_codes_agree_with_rustymimi(rust_codes, whole_codes):  # rust_codes first: skip before the long encode
    share = agreement(whole_codes, rust_codes)
    print("codes agreement per codebook:", " ".join(f"{a:.4f}" for a in share))
    assert share[0] >= 0.99 and share.min() >= 0.97, share


@pytest.mark.timeout(1800)
def test_decoded_audio_agrees_with_rustymimi(mimi_path, net, rust_codes):
    import rustymimi

    theirs = rustymimi.Tokenizer(str(mimi_path), num_codebooks=8).decode(rust_codes[None].copy()).reshape(-1)
    ours = np.array(net.decode(mx.array(rust_codes[None].astype(np.int32))))[0]
    snr = snr_db(theirs, ours)
    print(f"decode SNR vs rustymimi: {snr:.1f} dB")
    assert snr >= 40


@pytest.mark.timeout(1800)
def test_streaming_gives_the_codes_of_the_whole_clip(mimi_path, speech, whole_codes):
    """130 frames (10.4 s) through MlxMimi frame by frame, past the window's wrap after 125 frames, against the
    whole clip's codes (the codec is causal: a frame's codes never depend on later audio)."""
    n = 130
    with MlxMimi(mimi_path) as mimi:
        streamed = np.stack([mimi.encode_frame(f) for f in speech[: n * FRAME_SIZE].reshape(n, FRAME_SIZE)], -1)
    np.testing.assert_array_equal(streamed, whole_codes[:, :n])
