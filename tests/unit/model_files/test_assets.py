"""The one front door: `load(ModelSource(...), demo=...)`."""

import argparse
import json

import pytest

from moshi_mlx import ModelSource, load
from moshi_mlx.cli.flags import add_model_args
from moshi_mlx.errors import MoshiError, UsageError


@pytest.mark.parametrize(
    "source,flag",
    [(ModelSource(moshi_weights="notes.txt"), "--moshi-weights"), (ModelSource(quantize=4), "-q"),
     (ModelSource(hf_repo="kyutai/moshika-mlx-q4"), "--hf-repo")],
)
def test_demo_refuses_model_flags_instead_of_ignoring_them(source, flag):
    with pytest.raises(UsageError, match=f"--demo .*cannot use {flag}") as e:
        load(source, demo=True, log=lambda m: None)
    assert "\n" not in str(e.value)


def test_model_source_takes_the_cli_flags_by_name():
    args = add_model_args(argparse.ArgumentParser()).parse_args(["-q", "8", "--tokenizer", "t.model"])
    assert ModelSource.from_args(args) == ModelSource(quantize=8, tokenizer="t.model")
    assert ModelSource.from_args(args).given_flags == ["-q", "--tokenizer"]


def test_one_door_lists_and_dispatches_every_command():
    import subprocess
    import sys

    from moshi_mlx.__main__ import COMMANDS

    top = subprocess.run([sys.executable, "-m", "moshi_mlx", "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and all(name in top.stdout for name in COMMANDS)
    bad = subprocess.run([sys.executable, "-m", "moshi_mlx", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr
    # A real command behind the door: its own flag validation, before anything loads.
    run = subprocess.run([sys.executable, "-m", "moshi_mlx", "run", "in.wav", "out.wav", "--text-topk", "-3"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--text-topk" in run.stderr and "must be >= 0" in run.stderr


@pytest.mark.parametrize("extra,words", [
    ({"cross_attention": True}, "cross_attention=True"),
    ({"fuser": {"cross": ["description"]}}, "fuser.cross"),
    ({"conditioners": {"d": {"type": "tensor", "tensor": {"dim": 4}}}, "fuser": {"sum": ["d"]}}, "conditioners.d.type"),
    ({"brand_new_knob": 1}, "'brand_new_knob' is not known"),
])
def test_load_refuses_an_unsupported_config_key_before_any_weights(tmp_path, extra, words):
    """The LM config is read first: a refused key is one line naming it, and no weights file is even opened."""
    from moshi_mlx.models.config import config_tiny

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**config_tiny().to_kyutai_dict(), **extra}))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"never read")
    with pytest.raises(MoshiError) as e:
        load(ModelSource(lm_config=config, moshi_weights=weights), log=lambda m: None)
    assert words in str(e.value) and str(config) in str(e.value) and "\n" not in str(e.value)


def test_the_memory_plan_of_a_conditioned_model_holds_two_rows_of_keys_and_values():
    """Any client may turn guidance on (two batch rows): a conditioned model's KV budget is for both; the
    plan is the one the generator then allocates (checked against the LmGen's own cache)."""
    import mlx.core as mx

    from moshi_mlx.generate import LmGen
    from moshi_mlx.model_files.assets import Assets
    from moshi_mlx.model_files.checkpoint import build_model
    from moshi_mlx.model_files.stand_ins import tiny_hibiki_config
    from moshi_mlx.models.config import LmConfig

    mx.random.seed(0)
    lm = build_model(LmConfig.from_dict(tiny_hibiki_config()), None, mx.float32)
    plan = Assets(lm, None, None, "hibiki stand-in", False, 0.0).plan_memory(64.0, 8, log=lambda m: None)
    guided = LmGen(lm, cfg_coef=3.0, kv_bits=plan.kv_bits, context=plan.context)
    assert plan.kv_bytes == guided._cache.nbytes
