"""`convert --lora`: a LoRA adapter merged while converting, checked against a NumPy merge on random weights.

The base is the `moshi_7b` Kyutai fixture (a PyTorch state dict written by Kyutai's moshi 0.2.13, random
f32 weights); the adapter is random, in Kyutai's names (`NAME.lora_A.weight` [rank, in],
`NAME.lora_B.weight` [out, rank]) for the linears Kyutai wraps. Kyutai's merge is W + scaling * B @ A.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moshi_mlx.convert import main
from moshi_mlx.model_files.checkpoint import load_lm
from moshi_mlx.model_files.convert import convert
from moshi_mlx.model_files.lora import DEFAULT_SCALING
from moshi_mlx.models.config import LmConfig
from moshi_mlx.models.pytorch import ConvertError
from tests.helpers.kyutai import FIXTURES, delayed, max_gap, undelayed

BASE = FIXTURES / "moshi_7b"
KYUTAI_LORA = FIXTURES / "lora"  # an adapter in Kyutai's names, and the logits Kyutai's fine-tune loader gives
RANK = 4
# Linears Kyutai's replace_all_linear_with_lora wraps: attention, feed-forward, depformer in/out, text head.
LINEAR = re.compile(r".*(in_projs\.\d+|out_projs\.\d+|linear_in|linear_out|depformer_in\.\d+|linears\.\d+|text_linear)\.weight")


def _base() -> dict[str, np.ndarray]:
    return load_file(str(BASE / "model.safetensors"))


def _config(**lora) -> dict:
    return {**json.loads((BASE / "config.json").read_text(encoding="utf-8")), **lora}


def _adapter(base: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in base.items():
        if LINEAR.fullmatch(name):
            stem = name.removesuffix(".weight")
            out[f"{stem}.lora_A.weight"] = rng.normal(0, 0.2, (RANK, w.shape[1])).astype(np.float32)
            out[f"{stem}.lora_B.weight"] = rng.normal(0, 0.2, (w.shape[0], RANK)).astype(np.float32)
    return out


def _numpy_merge(base: dict[str, np.ndarray], adapter: dict[str, np.ndarray], scaling: float) -> dict[str, np.ndarray]:
    merged = dict(base)
    for name in base:
        stem = name.removesuffix(".weight")
        if f"{stem}.lora_A.weight" in adapter:
            update = adapter[f"{stem}.lora_B.weight"].astype(np.float64) @ adapter[f"{stem}.lora_A.weight"]
            merged[name] = (base[name] + scaling * update).astype(np.float32)
    return merged


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = _base()
    adapter = _adapter(base)
    save_file(adapter, str(root / "adapter.safetensors"))
    return root, base, adapter


def _convert(root: Path, src: Path, out: str, config: dict, **options) -> dict[str, np.ndarray]:
    (root / f"{out}.json").write_text(json.dumps(config), encoding="utf-8")
    path = convert(src, root / out, config=root / f"{out}.json", dtype="f32", log=lambda m: None, **options)
    return load_file(str(path))


def test_merged_conversion_equals_converting_numpy_merged_weights(files):
    root, base, adapter = files
    assert len(adapter) > 40  # every linear of both transformers, the depformer steps and the heads
    config = _config(lora=True, lora_rank=RANK, lora_scaling=0.5, lora_name="adapter.safetensors")
    got = _convert(root, BASE / "model.safetensors", "merged", config, lora=root / "adapter.safetensors")
    save_file(_numpy_merge(base, adapter, 0.5), str(root / "numpy_merged.safetensors"))
    plain = {k: v for k, v in config.items() if not k.startswith("lora")}
    want = _convert(root, root / "numpy_merged.safetensors", "want", plain)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-6, err_msg=name)
    # The merge really changed them: the attention of depformer step 2 reads in_projs.2 plus its update.
    name = "depformer.slices.2.transformer.layers.1.self_attn.in_proj.weight"
    assert np.abs(got[name] - base["depformer.layers.1.self_attn.in_projs.2.weight"]).max() > 0.05


def test_written_config_has_no_lora_keys_and_the_model_loads(files):
    root, _, _ = files
    config = _config(lora=True, lora_rank=RANK, lora_scaling=0.5)
    _convert(root, BASE / "model.safetensors", "cfg", config, lora=root / "adapter.safetensors")
    written = json.loads((root / "cfg" / "config.json").read_text(encoding="utf-8"))
    assert not {"lora", "lora_rank", "lora_scaling", "lora_name"} & written.keys()
    assert written["dep_q"] == config["dep_q"] and written["delays"] == config["delays"]


def test_scaling_defaults_to_kyutais_and_bf16_rounds_the_merged_weight(files):
    root, base, adapter = files
    (root / "plain.json").write_text(json.dumps(_config()), encoding="utf-8")
    path = convert(BASE / "model.safetensors", root / "bf16", config=root / "plain.json",
                   lora=root / "adapter.safetensors", log=lambda m: None)
    got = mx.load(str(path))["transformer.layers.0.gating.linear_in.weight"]
    merged = _numpy_merge(base, adapter, DEFAULT_SCALING)["transformer.layers.0.gating.linear_in.weight"]
    assert got.dtype == mx.bfloat16
    assert mx.array_equal(got, mx.array(merged).astype(mx.bfloat16))


def _mutated(adapter: dict[str, np.ndarray], case: str) -> dict[str, np.ndarray]:
    out = dict(adapter)
    key = "transformer.layers.0.self_attn.in_projs.0"
    if case == "stray":
        out["transformer.layers.0.norm1.alpha"] = np.ones((1, 1, 32), np.float32)
    elif case == "half":
        del out[f"{key}.lora_B.weight"]
    elif case == "unknown":
        out["nowhere.lora_A.weight"] = out[f"{key}.lora_A.weight"]
        out["nowhere.lora_B.weight"] = out[f"{key}.lora_B.weight"]
    elif case == "shape":
        out[f"{key}.lora_B.weight"] = out[f"{key}.lora_B.weight"][:5]
    elif case == "ranks":
        out[f"{key}.lora_A.weight"] = np.zeros((RANK + 1, 32), np.float32)
        out[f"{key}.lora_B.weight"] = np.zeros((96, RANK + 1), np.float32)
    return out


@pytest.mark.parametrize(
    ("case", "config", "pattern"),
    [
        ("stray", {}, r"norm1\.alpha is not a LoRA factor"),
        ("half", {}, r"in_projs\.0\.lora_B\.weight is missing"),
        ("unknown", {}, r"adapts nowhere\.weight, which the checkpoint does not have"),
        ("shape", {}, r"in_projs\.0\.weight is \[96, 32\] but its LoRA factors are \[4, 32\] and \[5, 4\]"),
        ("ranks", {}, r"ranks \[4, 5\]"),
        ("ok", {"lora_rank": 8}, r"lora_rank=8 but the adapter's factors have rank 4"),
        ("ok", {"lora_scaling": "two"}, r"lora_scaling='two'; expected a finite number"),
        ("ok", {"lora": False}, r"lora: false, but --lora gives an adapter"),
    ],
)
def test_bad_adapters_are_refused_in_one_line_before_writing(files, tmp_path, case, config, pattern):
    root, _, adapter = files
    save_file(_mutated(adapter, case), str(tmp_path / "a.safetensors"))
    (tmp_path / "c.json").write_text(json.dumps(_config(**config)), encoding="utf-8")
    with pytest.raises(ConvertError, match=pattern) as info:
        convert(BASE / "model.safetensors", tmp_path / "out", config=tmp_path / "c.json",
                lora=tmp_path / "a.safetensors", log=lambda m: None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_lora_true_needs_the_adapter_and_mlx_input_cannot_take_one(files, tmp_path):
    root, _, _ = files
    (tmp_path / "c.json").write_text(json.dumps(_config(lora=True, lora_name="ft.safetensors")), encoding="utf-8")
    with pytest.raises(ConvertError, match=r"lora: true: give the adapter file with --lora \(its lora_name: ft"):
        convert(BASE / "model.safetensors", tmp_path / "out", config=tmp_path / "c.json", log=lambda m: None)
    mlx_file = convert(BASE / "model.safetensors", tmp_path / "mlx", config=BASE / "config.json", log=lambda m: None)
    with pytest.raises(ConvertError, match=r"--lora needs the PyTorch checkpoint .* MLX layout"):
        convert(mlx_file, tmp_path / "out", config=BASE / "config.json", lora=root / "adapter.safetensors",
                log=lambda m: None)
    with pytest.raises(ConvertError, match=r"--lora .*nope\.safetensors: no such file"):
        convert(BASE / "model.safetensors", tmp_path / "out", config=BASE / "config.json",
                lora=tmp_path / "nope.safetensors", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_cli_merges_and_reports_the_adapter(files, tmp_path, capsys):
    root, _, _ = files
    args = [str(BASE / "model.safetensors"), str(tmp_path / "o"), "--config", str(BASE / "config.json"),
            "--lora", str(root / "adapter.safetensors"), "--dtype", "f32", "--no-progress"]
    assert main(args) == 0
    assert f"merging LoRA {root / 'adapter.safetensors'} (rank 4, scaling 2)" in capsys.readouterr().err
    args[5] = str(tmp_path / "missing.safetensors")
    assert main(args[:2] + ["--force"] + args[2:]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such file" in err and "\n" not in err


def test_kyutai_adapter_gives_kyutais_fine_tuned_logits(tmp_path):
    """The fixture's adapter (names from Kyutai's replace_all_linear_with_lora), merged by us, scores the
    fixture's codes as Kyutai's `get_moshi_lm(..., lora_weights=..., fuse_lora=True)` did, within 1e-4 (f32)."""
    config = json.loads((KYUTAI_LORA / "config.json").read_text(encoding="utf-8"))
    path = convert(BASE / "model.safetensors", tmp_path / "ft", config=KYUTAI_LORA / "config.json", dtype="f32",
                   lora=KYUTAI_LORA / "adapter.safetensors", log=lambda m: None)
    written = json.loads((tmp_path / "ft" / "config.json").read_text(encoding="utf-8"))
    model = load_lm(path, LmConfig.from_dict(written))
    expected = load_file(str(KYUTAI_LORA / "expected.safetensors"))
    start = [config["text_card"]] + [config["card"]] * config["n_q"]
    text, audio = model.forward(mx.array(delayed(expected["codes"], config["delays"], start).astype(np.int32)))
    audio, mask = undelayed(np.array(audio), config["delays"][1 : 1 + config["dep_q"]])
    text, text_mask = undelayed(np.array(text)[:, None], config["delays"][:1])
    np.testing.assert_array_equal(mask, expected["mask"])
    assert max_gap(text, expected["text_logits"], text_mask) <= 1e-4
    assert max_gap(audio, expected["logits"], mask) <= 1e-4
    # The adapter matters: the base model's logits (moshi_7b fixture) are far from these.
    base = load_file(str(BASE / "expected.safetensors"))
    assert max_gap(audio, base["logits"], mask) > 0.1
