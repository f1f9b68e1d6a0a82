"""PyTorch-layout checkpoints loaded in memory (`load_lm` on Kyutai's names): the same model `convert` writes.

Checked on random checkpoints in Kyutai's layout (tests/helpers/family.py) against our converter's output,
tensor for tensor, float and -q 4; and on Kyutai's own STT fixture (PyTorch moshi 0.2.13's state dict and
config.json) against its recorded greedy LMGen tokens.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import WeightsError, inspect_checkpoint, load_lm
from moshi_mlx.model_files.convert import convert
from moshi_mlx.models.config import LmConfig, read_kyutai_config
from moshi_mlx.settings import GREEDY
from tests.helpers.family import pytorch_checkpoint, variant_config
from tests.helpers.kyutai import FIXTURES


def _write(tmp_path, name: str, dtype=mx.float32):
    cfg = variant_config(name)
    weights = pytorch_checkpoint(cfg, np.random.default_rng(7))
    path = tmp_path / f"{name}.safetensors"
    mx.save_safetensors(str(path), {k: mx.array(v.astype(np.float32)).astype(dtype) for k, v in weights.items()})
    return cfg, path


def _params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("name", ["moshi", "low_rank_schedule_dep_rope", "stt_text_only", "hibiki_conditioned_extra_heads"])
def test_in_memory_load_equals_the_converted_file(tmp_path, name):
    cfg, path = _write(tmp_path, name)
    info = inspect_checkpoint(path, cfg)
    assert info.layout == "pytorch" and info.quantization is None
    config = read_kyutai_config(cfg)
    direct = load_lm(info, config)
    assert direct.dtype == mx.float32  # the file's own precision
    converted_path = convert(path, tmp_path / "mlx", config=cfg, dtype="f32", log=lambda m: None)
    converted = load_lm(converted_path, LmConfig.from_dict(json.loads((tmp_path / "mlx" / "config.json").read_text())))
    a, b = _params(direct), _params(converted)
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_quantized_at_load_time_equals_convert_q4(tmp_path):
    cfg, path = _write(tmp_path, "layer_norm_sin_gelu", mx.bfloat16)  # sizes a group of 32 divides
    direct = load_lm(inspect_checkpoint(path, cfg), read_kyutai_config(cfg), quantize=4)
    converted_path = convert(path, tmp_path / "mlx", bits=4, config=cfg, log=lambda m: None)
    converted = load_lm(converted_path, LmConfig.from_dict(json.loads((tmp_path / "mlx" / "config.json").read_text())))
    a, b = _params(direct), _params(converted)
    assert any(k.endswith(".scales") for k in a)
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_kyutai_stt_fixture_loads_in_memory_and_gives_pytorchs_tokens():
    folder = FIXTURES / "stt"
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model = load_lm(inspect_checkpoint(folder / "model.safetensors", raw), read_kyutai_config(raw))
    expected = load_file(str(folder / "expected.safetensors"))
    user = expected["user_codes"].astype(np.int32)
    gen = LmGen(model, GREEDY, GREEDY)
    tokens = [gen.step(user[t + 1]).text_token for t in range(len(user) - 1)]  # alignment: see the fixture README
    assert tokens == expected["text_tokens"][: len(tokens)].tolist()


def test_a_torn_pytorch_checkpoint_is_refused_at_inspection(tmp_path):
    cfg, path = _write(tmp_path, "moshi")
    torn = {k: v for k, v in mx.load(str(path)).items() if k != "out_norm.alpha"}
    mx.save_safetensors(str(tmp_path / "torn.safetensors"), torn)
    with pytest.raises(WeightsError, match="PyTorch-layout checkpoint that cannot be read: missing tensor out_norm"):
        inspect_checkpoint(tmp_path / "torn.safetensors", cfg)
