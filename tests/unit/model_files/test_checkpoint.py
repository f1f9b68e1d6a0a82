import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import (
    Quantization,
    WeightsError,
    build_model,
    expected_layout,
    inspect_checkpoint,
    load_lm,
    quantize_model,
    save_lm,
)
from moshi_mlx.models.config import config_tiny, config_v0_1, preset
from moshi_mlx.settings import GREEDY

QUANTS = {"bf16": None, "q8": Quantization(8, 64), "q4": Quantization(4, 32)}
MLX_DTYPES = {"bfloat16": mx.bfloat16, "uint32": mx.uint32, "float32": mx.float32}


@pytest.mark.parametrize("name", ["bf16", "q8", "q4"])
def test_7b_layout_matches_published_manifest_without_allocating(name, manifests_dir):
    manifest = json.loads((manifests_dir / f"moshi-7b-mlx-{name}.json").read_text())["tensors"]
    # Lazy: parameters are never evaluated, so no 7B of memory is touched.
    layout = expected_layout(build_model(config_v0_1(), QUANTS[name]))
    assert layout.keys() == manifest.keys()
    for tensor, spec in manifest.items():
        shape, dtype = layout[tensor]
        assert list(shape) == spec["shape"], tensor
        assert dtype == MLX_DTYPES[spec["dtype"]], tensor


def _tiny_file(tmp_path, quant, seed=0):
    mx.random.seed(seed)
    model = build_model(config_tiny(), quant)
    mx.eval(model.parameters())
    path = tmp_path / "model.safetensors"
    save_lm(model, path)
    return model, path


def _greedy_outputs(model, steps=6):
    gen = LmGen(model, GREEDY, GREEDY, seed=0)
    rng = np.random.default_rng(0)
    outs = [gen.step(rng.integers(0, 2048, 8)) for _ in range(steps)]
    return [(o.text_token, o.audio_codes.tolist()) for o in outs if o is not None]


@pytest.mark.parametrize("name", ["bf16", "q8", "q4"])
def test_round_trip_save_load_run(tmp_path, name):
    model, path = _tiny_file(tmp_path, QUANTS[name])
    info = inspect_checkpoint(path)
    assert info.quantization == QUANTS[name]
    loaded = load_lm(path, config_tiny(), mx.bfloat16)
    for (k, a), (k2, b) in zip(tree_flatten(model.parameters()), tree_flatten(loaded.parameters())):
        assert k == k2 and a.dtype == b.dtype and mx.array_equal(a, b).item(), k
    assert _greedy_outputs(loaded) == _greedy_outputs(model)


def test_quantized_computes_in_float32_on_cpu_with_published_scales(tmp_path):
    _, path = _tiny_file(tmp_path, QUANTS["q4"])
    model = load_lm(path, config_tiny())
    expected = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert model.out_norm.weight.dtype == expected
    assert model.text_linear.scales.dtype == mx.bfloat16 and model.text_emb.biases.dtype == mx.bfloat16
    assert model.text_linear.weight.dtype == mx.uint32
    assert len(_greedy_outputs(model)) == 5


def test_quantized_outputs_close_to_bf16(tmp_path):
    mx.random.seed(3)
    ref = build_model(config_tiny(), None, mx.float32)
    mx.eval(ref.parameters())
    path = tmp_path / "f.safetensors"
    save_lm(ref, path)
    q8 = load_lm(path, config_tiny(), mx.bfloat16)
    from mlx import nn

    nn.quantize(q8, group_size=64, bits=8)
    tokens = mx.array(np.random.default_rng(0).integers(0, 2048, (1, 17)).astype(np.int32))
    logits = []
    for model in (ref, q8):
        cache = model.make_cache()
        logits.append(np.array(model.temporal(tokens, cache.layers, cache.context())[1].astype(mx.float32))[0])
    corr = np.corrcoef(logits[0], logits[1])[0, 1]
    assert corr > 0.99, corr


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_a_bf16_checkpoint_while_loading_gives_the_quantized_files_model(tmp_path, bits):
    """-q on a bf16-only repo (Hibiki): the same packed weights as quantizing the bf16 model, and it runs."""
    _, path = _tiny_file(tmp_path, None)
    at_load = load_lm(path, config_tiny(), quantize=bits)
    expected = load_lm(path, config_tiny(), at_load.dtype)
    quantize_model(expected, Quantization(bits, {8: 64, 4: 32}[bits]))
    assert at_load.text_linear.bits == bits and at_load.text_linear.weight.dtype == mx.uint32
    for (k, a), (k2, b) in zip(tree_flatten(expected.parameters()), tree_flatten(at_load.parameters())):
        assert k == k2 and a.dtype == b.dtype and mx.array_equal(a, b).item(), k
    assert _greedy_outputs(at_load) == _greedy_outputs(expected)
    q_path = tmp_path / "q.safetensors"
    save_lm(at_load, q_path)
    with pytest.raises(WeightsError, match="already quantized"):
        load_lm(q_path, config_tiny(), quantize=bits)


def _write_header(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_lm(tmp_path / "nope.safetensors", config_tiny())


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_text("<html>rate limited</html>" * 10)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_lm(bad, config_tiny())


def test_truncated_file(tmp_path):
    _, path = _tiny_file(tmp_path, None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_lm(path, config_tiny())


def test_missing_and_unexpected_keys(tmp_path):
    model, _ = _tiny_file(tmp_path, None)
    weights = dict(tree_flatten(model.parameters()))
    weights.pop("out_norm.weight")
    weights["extra_heads.0.weight"] = mx.zeros((2, 2))
    path = tmp_path / "x.safetensors"
    mx.save_safetensors(str(path), weights)
    with pytest.raises(WeightsError, match=r"1 missing \(out_norm.weight\); 1 unexpected \(extra_heads.0.weight\)"):
        load_lm(path, config_tiny())


def test_wrong_shape_names_the_tensor(tmp_path):
    model, _ = _tiny_file(tmp_path, None)
    weights = dict(tree_flatten(model.parameters()))
    weights["transformer.layers.1.norm1.weight"] = mx.zeros((7,), dtype=mx.bfloat16)
    path = tmp_path / "x.safetensors"
    mx.save_safetensors(str(path), weights)
    with pytest.raises(WeightsError, match=r"transformer.layers.1.norm1.weight has shape \[7\]"):
        load_lm(path, config_tiny())


def test_weights_for_another_model_size(tmp_path):
    _, path = _tiny_file(tmp_path, QUANTS["q4"])
    with pytest.raises(WeightsError):
        load_lm(path, preset("small"))


def test_header_byte_count_mismatch(tmp_path):
    path = tmp_path / "m.safetensors"
    _write_header(path, {"text_linear.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(WeightsError, match="not a safetensors file .invalid shape, data type, or offset"):
        inspect_checkpoint(path)


def test_quantization_written_in_config_wins_and_is_checked(tmp_path):
    """As mlx-lm does: the config's `quantization` entry decides; shapes are only the fallback."""
    _, path = _tiny_file(tmp_path, QUANTS["q4"])
    inferred = inspect_checkpoint(path).quantization
    written = inspect_checkpoint(path, {"quantization": {"bits": 4, "group_size": inferred.group_size}}).quantization
    assert written == inferred and inferred.bits == 4
    with pytest.raises(WeightsError, match="bad quantization entry"):
        inspect_checkpoint(path, {"quantization": {"bits": "four"}})
    wrong = inspect_checkpoint(path, {"quantization": {"bits": 8, "group_size": 64}})
    with pytest.raises(WeightsError, match="has shape"):  # a config that lies about the file is caught by the layout check
        load_lm(wrong, config_tiny())


def test_the_7b_manifests_come_with_the_repository(monkeypatch):
    """A fresh clone checks the 7B layout too: the manifests are test fixtures, not the team's shared folder."""
    from tests.helpers.shared import REPO, find_manifests

    monkeypatch.delenv("MOSHI_MLX_MANIFESTS", raising=False)
    folder = find_manifests()
    assert folder.is_relative_to(REPO), folder
    for name in ("moshi-7b-mlx-bf16", "moshi-7b-mlx-q4", "moshi-7b-mlx-q8", "moshi-7b-pytorch-bf16", "mimi"):
        assert json.loads((folder / f"{name}.json").read_text())["tensors"], name
