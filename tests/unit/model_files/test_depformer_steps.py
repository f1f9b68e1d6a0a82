"""`convert --max-out-n-q N`: the first N depformer steps of a model trained with more.

On Kyutai fixtures (PyTorch state dicts written by moshi 0.2.13, random weights): the kept slices are the
full conversion's, byte for byte, the config says dep_q N with everything else unchanged, and because the
depformer is causal over its steps the trimmed model scores the first N codebooks exactly as the full one.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from moshi_mlx.convert import main
from moshi_mlx.model_files.convert import convert
from moshi_mlx.model_files.depformer_steps import trimmed_config
from moshi_mlx.models.pytorch import ConvertError
from tests.helpers.kyutai import FIXTURES, convert_fixture, delayed

MOSHI = FIXTURES / "moshi_7b"


def _scores(model, folder, config: dict):
    expected = load_file(str(folder / "expected.safetensors"))
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    start = [config["text_card"]] + [config["card"]] * config["n_q"]
    tokens = mx.array(delayed(expected["codes"], config["delays"], start).astype(np.int32))
    options = {}
    if meta["conditions"]:
        (name, rows), = meta["conditions"].items()
        options["condition"] = mx.concatenate([model.condition({name: v}) for v in rows], axis=0)
    text, audio = model.forward(tokens, **options)
    return np.array(text), np.array(audio)


@pytest.mark.parametrize(("family", "keep"), [("moshi_7b", 2), ("hibiki_2b", 8)])
def test_kept_steps_score_like_the_full_model(tmp_path, family, keep):
    folder = FIXTURES / family
    full, full_cfg = convert_fixture(folder, tmp_path / "full")
    kept, kept_cfg = convert_fixture(folder, tmp_path / "kept", max_out_n_q=keep)
    assert kept_cfg["dep_q"] == keep and full_cfg["dep_q"] > keep
    # depformer_context may follow too: Kyutai's depformer attends to its whole frame whatever the key says.
    follow = ("dep_q", "depformer_context")
    assert {k: v for k, v in kept_cfg.items() if k not in follow} == {k: v for k, v in full_cfg.items() if k not in follow}
    full_w = load_file(str(tmp_path / "full" / "model.safetensors"))
    kept_w = load_file(str(tmp_path / "kept" / "model.safetensors"))
    dropped = {n for n in full_w if any(n.startswith(f"depformer.slices.{k}.") for k in range(keep, full_cfg["dep_q"]))}
    assert dropped and kept_w.keys() == full_w.keys() - dropped
    for name, value in kept_w.items():
        np.testing.assert_array_equal(value, full_w[name], err_msg=name)
    text_full, audio_full = _scores(full, folder, full_cfg)
    text_kept, audio_kept = _scores(kept, folder, kept_cfg)
    assert audio_kept.shape[1] == keep
    np.testing.assert_allclose(text_kept, text_full, rtol=0, atol=1e-6)
    np.testing.assert_allclose(audio_kept, audio_full[:, :keep], rtol=0, atol=1e-6)


def test_an_mlx_layout_input_is_trimmed_too(tmp_path):
    whole = convert(MOSHI / "model.safetensors", tmp_path / "a", config=MOSHI / "config.json", dtype="f32",
                    log=lambda m: None)
    kept = convert(whole, tmp_path / "b", config=tmp_path / "a" / "config.json", dtype="f32", max_out_n_q=3,
                   log=lambda m: None)
    names = load_file(str(kept)).keys()
    assert any(n.startswith("depformer.slices.2.") for n in names)
    assert not any(n.startswith("depformer.slices.3.") for n in names)
    assert json.loads((tmp_path / "b" / "config.json").read_text(encoding="utf-8"))["dep_q"] == 3


def test_the_schedule_and_dep_q_follow_the_kept_steps():
    config = {"n_q": 32, "dep_q": 16, "depformer_weights_per_step_schedule": [0, 1, 2, 2] + [3] * 12, "dim": 8}
    assert trimmed_config(config, 3, 16) == {**config, "dep_q": 3, "depformer_weights_per_step_schedule": [0, 1, 2]}
    assert trimmed_config(config, None, 16) is config
    assert trimmed_config(None, 3, 16) is None
    # A dep_q that disagrees with the checkpoint stays, so the config check names the disagreement.
    assert trimmed_config({"dep_q": 12}, 3, 16) == {"dep_q": 12}


@pytest.mark.parametrize(("value", "pattern"), [
    (0, r"positive number of depformer steps, got 0"),
    (-2, r"positive number of depformer steps, got -2"),
    (True, r"positive number of depformer steps, got True"),
    (5, r"--max-out-n-q 5: the checkpoint's depformer has only 4 steps"),
])
def test_bad_counts_are_refused_in_one_line_before_writing(tmp_path, value, pattern):
    with pytest.raises(ConvertError, match=pattern) as info:
        convert(MOSHI / "model.safetensors", tmp_path / "out", config=MOSHI / "config.json", max_out_n_q=value,
                log=lambda m: None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_flag(tmp_path, capsys):
    base = [str(MOSHI / "model.safetensors"), str(tmp_path / "o"), "--config", str(MOSHI / "config.json"),
            "--no-progress"]
    assert main(base + ["--max-out-n-q", "2"]) == 0
    assert "keeping the first 2 depformer steps" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "config.json").read_text(encoding="utf-8"))["dep_q"] == 2
    with pytest.raises(SystemExit) as info:
        main(base + ["--max-out-n-q", "0"])
    assert info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
