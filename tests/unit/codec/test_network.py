"""The whole MLX Mimi on a random checkpoint in the published layout: loading, codebooks, streaming, errors.

Agreement with rustymimi over 30 s of speech is tests/e2e/test_mimi_parity.py; a short check is here.
"""

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moshi_mlx.codec.network import CodecWeightsError, MimiNetwork
from moshi_mlx.model_files.stand_ins import mimi_tensor_layout
from tests.helpers.mimi_signals import agreement, snr_db, speechy

FRAMES = 6


@pytest.fixture(scope="module")
def net(mimi_path):
    return MimiNetwork.load(mimi_path, 8)


def stream_encode(net, pcm):
    stream = net.new_stream()
    return np.stack([np.array(net.encode_step(mx.array(f[None]), stream))[0] for f in pcm.reshape(-1, 1920)], -1)


def stream_decode(net, codes):
    stream = net.new_stream()
    return np.concatenate([np.array(net.decode_step(mx.array(codes[None, :, i]), stream))[0] for i in range(codes.shape[1])])


def test_streaming_equals_the_whole_clip(net):
    pcm = speechy(FRAMES, seed=3)
    codes = stream_encode(net, pcm)
    assert codes.shape == (8, FRAMES) and codes.dtype == np.int32 and 0 <= codes.min() and codes.max() < 2048
    np.testing.assert_array_equal(codes, np.array(net.encode(mx.array(pcm[None])))[0])
    whole = np.array(net.decode(mx.array(codes[None])))[0]
    assert whole.shape == (FRAMES * 1920,)
    assert snr_db(whole, stream_decode(net, codes)) > 80


def test_a_new_stream_starts_afresh(net):
    pcm = speechy(3, seed=4)
    np.testing.assert_array_equal(stream_encode(net, pcm), stream_encode(net, pcm))


@pytest.mark.parametrize("k", [1, 16, 32])
def test_codebook_counts(mimi_path, net, k):
    other = MimiNetwork.load(mimi_path, k)
    pcm = speechy(2, seed=5)
    codes = stream_encode(other, pcm)
    assert codes.shape == (k, 2)
    # the codebooks are residual: the first min(k, 8) agree with the 8-codebook network's
    m = min(k, 8)
    np.testing.assert_array_equal(codes[:m], stream_encode(net, pcm)[:m])
    assert stream_decode(other, codes).shape == (2 * 1920,)
    assert (other.nbytes < net.nbytes) == (k < 8)


def test_agrees_with_rustymimi_on_a_short_clip(mimi_path, net):
    rustymimi = pytest.importorskip("rustymimi", reason="rustymimi is not installed: nothing to compare with")
    pcm = speechy(FRAMES, seed=6)
    tok = rustymimi.Tokenizer(str(mimi_path), num_codebooks=8)
    theirs = np.concatenate([tok.encode_step(f.reshape(1, 1, -1).copy()) for f in pcm.reshape(-1, 1920)], -1)[0]
    assert agreement(stream_encode(net, pcm), theirs).min() >= 0.97
    tok = rustymimi.Tokenizer(str(mimi_path), num_codebooks=8)
    their_pcm = np.concatenate([tok.decode_step(theirs[None, :, i : i + 1].copy()) for i in range(FRAMES)], -1)
    assert snr_db(their_pcm.reshape(-1), stream_decode(net, theirs.astype(np.int32))) >= 40


def test_bad_files_are_one_line(tmp_path, mimi_path):
    with pytest.raises(CodecWeightsError, match="cannot read Mimi weights"):
        MimiNetwork.load(tmp_path / "missing.safetensors")
    tensors = load_file(str(mimi_path))
    gone = "decoder_transformer.transformer.layers.3.linear1.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CodecWeightsError, match=f"no tensor {gone}") as e:
        MimiNetwork.load(tmp_path / "partial.safetensors")
    assert "\n" not in str(e.value)
    wrong = dict(tensors, **{"encoder.model.3.conv.conv.weight": np.zeros((128, 64, 6), np.float32)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CodecWeightsError, match="do not fit") as e:
        MimiNetwork.load(tmp_path / "wrong.safetensors")
    assert "\n" not in str(e.value)


def test_the_stand_in_layout_is_what_the_network_reads(mimi_path):
    """The network reads every tensor of the published layout but the codebooks' `_initialized` flags."""
    layout = mimi_tensor_layout()
    read: list[str] = []
    tensors = load_file(str(mimi_path))

    def get(name, shape):
        read.append(name)
        assert tensors[name].shape == shape == layout[name], name
        return tensors[name]

    MimiNetwork(get, 32)
    assert set(read) <= set(layout)
    assert {name.rsplit(".", 1)[-1] for name in set(layout) - set(read)} == {"_initialized"}
