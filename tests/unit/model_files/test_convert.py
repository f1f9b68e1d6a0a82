"""PyTorch -> MLX checkpoint conversion, streamed: tiny stand-ins end to end, wrong inputs, the command.

The pure name plan (the 7B mapping on the manifests) is tests/unit/models/test_pytorch.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import moshi_mlx.model_files.convert as streaming
from moshi_mlx.convert import main
from moshi_mlx.model_files.checkpoint import load_lm
from moshi_mlx.model_files.convert import convert, expected_specs
from moshi_mlx.models.config import LmConfig
from moshi_mlx.models.pytorch import ConvertError, Dims
from tests.helpers import numpy_lm
from tests.helpers.family import delayed_sequence, pytorch_checkpoint, variant_config
from tests.helpers.pytorch_names import legacy as _legacy

# Tiny but quantizable (every input dim divides 64): see the stand-ins doc.
TINY = Dims(
    dim=256, num_layers=4, hidden=704, text_in=501, text_out=500, audio_vocab=129,
    n_q=4, dep_q=2, dep_dim=256, dep_layers=2, dep_hidden=704,
)


# ---------------------------------------------------------------------------------------------------------
# tiny stand-ins, end to end


def pytorch_shapes(d: Dims, legacy: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a PyTorch-layout Moshi checkpoint (moshi 0.2.x state_dict naming)."""
    s: dict[str, tuple[int, ...]] = {"text_emb.weight": (d.text_in, d.dim), "text_linear.weight": (d.text_out, d.dim)}
    s["out_norm.alpha"] = (1, 1, d.dim)
    for i in range(d.n_q):
        s[f"emb.{i}.weight"] = (d.audio_vocab, d.dim)
    for l in range(d.num_layers):
        p = f"transformer.layers.{l}"
        s[f"{p}.self_attn.in_projs.0.weight"] = (3 * d.dim, d.dim)
        s[f"{p}.self_attn.out_projs.0.weight"] = (d.dim, d.dim)
        s[f"{p}.norm1.alpha"] = s[f"{p}.norm2.alpha"] = (1, 1, d.dim)
        s[f"{p}.gating.linear_in.weight"] = (2 * d.hidden, d.dim)
        s[f"{p}.gating.linear_out.weight"] = (d.dim, d.hidden)
    D = d.dep_dim
    s["depformer_text_emb.weight"] = (d.text_in, D)
    for k in range(d.dep_q):
        s[f"depformer_in.{k}.weight"] = (D, d.dim)
        s[f"linears.{k}.weight"] = (d.audio_vocab - 1, D)
        if k:
            s[f"depformer_emb.{k - 1}.weight"] = (d.audio_vocab, D)
    for l in range(d.dep_layers):
        p = f"depformer.layers.{l}"
        s[f"{p}.norm1.alpha"] = s[f"{p}.norm2.alpha"] = (1, 1, D)
        for k in range(d.dep_q):
            s[f"{p}.self_attn.in_projs.{k}.weight"] = (3 * D, D)
            s[f"{p}.self_attn.out_projs.{k}.weight"] = (D, D)
            s[f"{p}.gating.{k}.linear_in.weight"] = (2 * d.dep_hidden, D)
            s[f"{p}.gating.{k}.linear_out.weight"] = (D, d.dep_hidden)
    return _legacy(s) if legacy else s


def write_random(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, mx.array]:
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    arrays = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        arrays[name] = (0.05 * mx.random.normal(shape, key=keys[i])).astype(mx.bfloat16)
    mx.save_safetensors(str(path), arrays)
    return arrays


def reference_mlx(src: dict[str, mx.array], d: Dims) -> dict[str, mx.array]:
    """The MLX tensors a correct conversion must produce, written out rule by rule from the PyTorch names."""
    out = {"text_emb.weight": src["text_emb.weight"], "text_linear.weight": src["text_linear.weight"]}
    out["out_norm.weight"] = src["out_norm.alpha"].reshape(-1)
    for i in range(d.n_q):
        out[f"audio_embs.{i}.weight"] = src[f"emb.{i}.weight"]
    K, D = d.dep_q, d.dep_dim

    def attn(prefix: str, kind: str, k: int, rows: int) -> mx.array:
        current = f"{prefix}.self_attn.{kind}_projs.{k}.weight"
        if current in src:
            return src[current]
        stacked = src[f"{prefix}.self_attn.in_proj_weight" if kind == "in" else f"{prefix}.self_attn.out_proj.weight"]
        return stacked[k * rows : (k + 1) * rows]

    for l in range(d.num_layers):
        p = f"transformer.layers.{l}"
        out[f"{p}.self_attn.in_proj.weight"] = attn(p, "in", 0, 3 * d.dim)
        out[f"{p}.self_attn.out_proj.weight"] = attn(p, "out", 0, d.dim)
        for n in ("norm1", "norm2"):
            out[f"{p}.{n}.weight"] = src[f"{p}.{n}.alpha"].reshape(-1)
        for n in ("linear_in", "linear_out"):
            out[f"{p}.gating.{n}.weight"] = src[f"{p}.gating.{n}.weight"]
    for k in range(K):
        s = f"depformer.slices.{k}"
        out[f"{s}.emb.weight"] = src["depformer_text_emb.weight"] if k == 0 else src[f"depformer_emb.{k - 1}.weight"]
        out[f"{s}.linear_in.weight"] = src[f"depformer_in.{k}.weight"]
        out[f"{s}.linear_out.weight"] = src[f"linears.{k}.weight"]
        for l in range(d.dep_layers):
            q, t = f"depformer.layers.{l}", f"{s}.transformer.layers.{l}"
            out[f"{t}.self_attn.in_proj.weight"] = attn(q, "in", k, 3 * D)
            out[f"{t}.self_attn.out_proj.weight"] = attn(q, "out", k, D)
            for n in ("norm1", "norm2"):
                out[f"{t}.{n}.weight"] = src[f"{q}.{n}.alpha"].reshape(-1)
            for n in ("linear_in", "linear_out"):
                out[f"{t}.gating.{n}.weight"] = src[f"{q}.gating.{k}.{n}.weight"]
    return out


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """Random tiny PyTorch-layout checkpoints in both naming forms (same values)."""
    root = tmp_path_factory.mktemp("pt")
    current = root / "current.safetensors"
    arrays = write_random(current, pytorch_shapes(TINY))
    legacy_arrays = dict(arrays)
    for name in list(legacy_arrays):
        m = re.fullmatch(r"(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight", name)
        if m:
            del legacy_arrays[name]
    stacked = {}
    for prefix, count in [(f"transformer.layers.{l}", 1) for l in range(TINY.num_layers)] + [
        (f"depformer.layers.{l}", TINY.dep_q) for l in range(TINY.dep_layers)
    ]:
        stacked[f"{prefix}.self_attn.in_proj_weight"] = mx.concatenate(
            [arrays[f"{prefix}.self_attn.in_projs.{k}.weight"] for k in range(count)]
        )
        stacked[f"{prefix}.self_attn.out_proj.weight"] = mx.concatenate(
            [arrays[f"{prefix}.self_attn.out_projs.{k}.weight"] for k in range(count)]
        )
    legacy_arrays.update(stacked)
    assert set(legacy_arrays) == set(pytorch_shapes(TINY, legacy=True))
    legacy = root / "legacy.safetensors"
    mx.save_safetensors(str(legacy), legacy_arrays)
    return {"current": (current, arrays), "legacy": (legacy, legacy_arrays)}


def _assert_loads_like_published(path: Path, cfg_path: Path, bits):
    """Names/shapes/dtypes exactly as a published file for this config, and the app's strict loader takes it."""
    cfg = LmConfig.from_dict(json.loads(cfg_path.read_text()))
    written = mx.load(str(path))
    dtypes = {mx.bfloat16: "BF16", mx.uint32: "U32"}
    assert {k: (tuple(v.shape), dtypes[v.dtype]) for k, v in written.items()} == expected_specs(cfg, bits)
    model = load_lm(path, cfg)
    assert set(dict(tree_flatten(model.parameters()))) == set(written)
    return model, written


@pytest.mark.parametrize("form", ["current", "legacy"])
def test_tiny_bf16_conversion_is_exact(tmp_path, tiny_sources, form):
    src_path, src = tiny_sources[form]
    out = convert(src_path, tmp_path, log=lambda m: None)
    assert out == tmp_path / "model.safetensors"
    assert not list(tmp_path.glob("*.partial"))
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["moshi_name"] == "model.safetensors"
    assert cfg_json["dim"] == 256 and cfg_json["n_q"] == 4 and cfg_json["dep_q"] == 2
    assert cfg_json["text_card"] == 500 and cfg_json["card"] == 128
    model, written = _assert_loads_like_published(out, tmp_path / "config.json", None)
    ref = reference_mlx(src, TINY)
    assert set(written) == set(ref)
    for k, v in ref.items():
        assert written[k].dtype == mx.bfloat16
        assert mx.array_equal(written[k], v).item(), k
    # ... and the values reach the model's parameters unchanged.
    params = dict(tree_flatten(model.parameters()))
    names = ("depformer.slices.1.transformer.layers.1.norm2.weight", "depformer.slices.1.emb.weight", "out_norm.weight")
    for k in names:
        assert mx.array_equal(params[k], ref[k]).item()


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_tiny_quantized_conversion_matches_mx_quantize(tmp_path, tiny_sources, bits, group):
    src_path, src = tiny_sources["legacy"]
    out = convert(src_path, tmp_path, bits=bits, log=lambda m: None)
    assert out.name == f"model.q{bits}.safetensors"
    written_cfg = json.loads((tmp_path / "config.json").read_text())
    assert written_cfg["moshi_name"] == out.name
    assert written_cfg["quantization"] == {"bits": bits, "group_size": group}  # written down, not left to inference
    _, written = _assert_loads_like_published(out, tmp_path / "config.json", bits)
    ref = reference_mlx(src, TINY)
    for name, value in ref.items():
        if value.ndim == 1:  # norms stay bf16
            assert written[name].dtype == mx.bfloat16 and mx.array_equal(written[name], value).item()
            continue
        base = name[: -len(".weight")]
        w, scales, biases = written[name], written[base + ".scales"], written[base + ".biases"]
        assert w.dtype == mx.uint32 and scales.dtype == mx.bfloat16 and biases.dtype == mx.bfloat16
        assert w.shape == (value.shape[0], value.shape[1] * bits // 32)
        assert scales.shape == (value.shape[0], value.shape[1] // group)
        # Bit-identical to what nn.quantize produces from the same bf16 weights (the published recipe).
        qw, qs, qb = mx.quantize(value, group_size=group, bits=bits)
        assert mx.array_equal(w, qw).item() and mx.array_equal(scales, qs).item() and mx.array_equal(biases, qb).item()
        back = mx.dequantize(w, scales, biases, group_size=group, bits=bits).astype(mx.float32)
        err = mx.abs(back - value.astype(mx.float32)).max().item()
        step = mx.abs(scales.astype(mx.float32)).max().item()
        scale_of_values = mx.abs(value.astype(mx.float32)).max().item()
        # within about a quantization step (bf16 scales/biases and bf16 output add rounding)
        assert err <= step + scale_of_values * 2**-6, (name, err, step)
        v32 = value.astype(mx.float32)
        rel = (mx.sqrt(mx.mean((back - v32) ** 2)) / mx.sqrt(mx.mean(v32**2))).item()
        assert rel < (0.01 if bits == 8 else 0.15), (name, rel)


def test_mlx_bf16_input_is_requantized(tmp_path, tiny_sources):
    src_path, src = tiny_sources["current"]
    bf16 = convert(src_path, tmp_path / "bf16", log=lambda m: None)
    q4 = convert(bf16, tmp_path / "q4", bits=4, log=lambda m: None)
    direct = convert(src_path, tmp_path / "direct", bits=4, log=lambda m: None)
    a, b = mx.load(str(q4)), mx.load(str(direct))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
    with pytest.raises(ConvertError, match="already quantized"):
        convert(q4, tmp_path / "again", bits=8, log=lambda m: None)


def test_written_file_is_valid_safetensors(tmp_path, tiny_sources):
    import safetensors
    out = convert(tiny_sources["current"][0], tmp_path, bits=8, log=lambda m: None)
    with safetensors.safe_open(str(out), framework="numpy") as f:  # the reference parser validates offsets
        keys = set(f.keys())
        assert f.metadata() == {"format": "mlx"}
        w = f.get_tensor("text_linear.weight")
    assert keys == set(mx.load(str(out)))
    assert w.dtype.name == "uint32" and w.shape == (500, 256 * 8 // 32)


def test_config_file_fills_what_shapes_do_not_show(tmp_path, tiny_sources):
    cfg = tmp_path / "in.json"
    cfg.write_text(json.dumps({"num_heads": 4, "depformer_num_heads": 4, "context": 100, "delays": [0, 0, 2, 0, 2]}))
    convert(tiny_sources["current"][0], tmp_path / "o", config=cfg, log=lambda m: None)
    out = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out["num_heads"] == 4 and out["context"] == 100 and out["delays"] == [0, 0, 2, 0, 2]
    c = LmConfig.from_dict(out)
    assert c.transformer.num_heads == 4 and c.audio_delays == (0, 2, 0, 2)
    # Values the shapes fix must agree.
    cfg.write_text(json.dumps({"dim": 512}))
    with pytest.raises(ConvertError, match=r"dim=512 .* 256"):
        convert(tiny_sources["current"][0], tmp_path / "p", config=cfg, log=lambda m: None)
    cfg.write_text(json.dumps({"delays": [0, 1]}))
    with pytest.raises(ConvertError, match="delays has 2 entries"):
        convert(tiny_sources["current"][0], tmp_path / "p", config=cfg, log=lambda m: None)


# ---------------------------------------------------------------------------------------------------------
# wrong inputs: one clear line


def _save(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    mx.save_safetensors(str(path), {k: mx.zeros(v, dtype=mx.bfloat16) for k, v in shapes.items()})
    return path


def test_wrong_inputs_give_one_line_errors(tmp_path, tiny_sources):
    shapes = pytorch_shapes(TINY)
    cases = []
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, I am not a checkpoint at all\n")
    cases.append((text, "not a safetensors file"))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cases.append((empty, "empty"))
    cases.append((tmp_path / "nope.safetensors", "no such file"))
    mimi = _save(tmp_path / "mimi.safetensors", {"encoder.model.0.conv.conv.weight": (4, 1, 7), "quantizer.x": (2,)})
    cases.append((mimi, "Mimi codec weights"))
    other = _save(tmp_path / "other.safetensors", {"model.embed_tokens.weight": (8, 8)})
    cases.append((other, "not a PyTorch Moshi LM checkpoint"))
    missing = dict(shapes)
    del missing["depformer.layers.1.gating.1.linear_out.weight"]
    missing_path = _save(tmp_path / "missing.safetensors", missing)
    cases.append((missing_path, r"missing tensor depformer\.layers\.1\.gating\.1\."))
    bad_shape = dict(shapes)
    bad_shape["linears.1.weight"] = (64, TINY.dep_dim)
    shape_path = _save(tmp_path / "shape.safetensors", bad_shape)
    cases.append((shape_path, r"linears\.1\.weight has shape \[64, 256\], expected \[128, 256\]"))
    extra = dict(shapes)
    extra["condition_provider.foo.weight"] = (2, 2)
    cases.append((_save(tmp_path / "extra.safetensors", extra), r"unexpected tensor condition_provider\.foo\.weight"))
    truncated = tmp_path / "truncated.safetensors"
    data = tiny_sources["current"][0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases.append((truncated, "truncated"))
    for path, pattern in cases:
        with pytest.raises(ConvertError, match=pattern) as info:
            convert(path, tmp_path / "out", log=lambda m: None)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_cli(tmp_path, tiny_sources, capsys):
    assert main([str(tiny_sources["legacy"][0]), str(tmp_path / "o"), "-q", "4", "--no-progress"]) == 0
    assert (tmp_path / "o" / "model.q4.safetensors").is_file() and (tmp_path / "o" / "config.json").is_file()
    err = capsys.readouterr().err
    assert "pytorch layout" in err and "num_heads=2" in err
    assert main([str(tmp_path / "missing.safetensors"), str(tmp_path / "p")]) == 1  # one exit-code policy (moshi_mlx.cli): a user error is 1, bad flags 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no such file" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main([str(tiny_sources["legacy"][0]), str(tmp_path / "p"), "-q", "3"])
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# never over an input, never half a file


def test_output_never_overwrites_the_input(tmp_path, tiny_sources):
    """`convert model.safetensors .` from the checkpoint's own folder would replace it by its output."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    src = folder / "model.safetensors"
    shutil.copy(tiny_sources["current"][0], src)
    before = src.read_bytes()
    with pytest.raises(ConvertError, match="is the input file") as e:
        convert(src, folder, log=lambda m: None, force=True)
    assert "\n" not in str(e.value) and src.read_bytes() == before
    cfg = folder / "config.json"
    text = json.dumps({"num_heads": 4, "depformer_num_heads": 4, "context": 100, "delays": [0, 0, 2, 0, 2]})
    cfg.write_text(text)
    with pytest.raises(ConvertError, match="is the input file"):
        convert(src, folder, bits=4, config=cfg, log=lambda m: None, force=True)
    assert cfg.read_text() == text and src.read_bytes() == before and not (folder / "model.q4.safetensors").exists()


def test_cli_refuses_a_non_empty_folder_unless_forced(tmp_path, tiny_sources, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    src = str(tiny_sources["legacy"][0])
    assert main([src, str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not empty" in err and "--force" in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([src, str(out), "--no-progress", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_input_is_a_directory_or_output_a_file(tmp_path, tiny_sources, capsys):
    assert main([str(tmp_path), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "is a directory" in err and "no such file" not in err and "\n" not in err
    (tmp_path / "f").write_text("x")
    assert main([str(tiny_sources["legacy"][0]), str(tmp_path / "f")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_interrupted_conversion_leaves_no_file(tmp_path, tiny_sources, monkeypatch):
    def boom(self, name, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming._Writer, "write", boom)
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier conversion")
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_sources["current"][0], out, log=lambda m: None, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"an earlier conversion"


def test_f32_conversion_keeps_full_precision_and_loads_as_f32(tmp_path):
    """--dtype f32: an f32 PyTorch checkpoint converts bit-exactly and loads as f32 (nothing rounded silently)."""
    shapes = pytorch_shapes(TINY)
    keys = mx.random.split(mx.random.key(3), len(shapes))
    src = {n: 0.05 * mx.random.normal(s, key=keys[i]) for i, (n, s) in enumerate(sorted(shapes.items()))}
    mx.save_safetensors(str(tmp_path / "f32.safetensors"), src)
    assert main([str(tmp_path / "f32.safetensors"), str(tmp_path / "o"), "--dtype", "f32", "--no-progress"]) == 0
    written = mx.load(str(tmp_path / "o" / "model.safetensors"))
    ref = reference_mlx(src, TINY)
    assert all(written[k].dtype == mx.float32 and mx.array_equal(written[k], v).item() for k, v in ref.items())
    cfg = LmConfig.from_dict(json.loads((tmp_path / "o" / "config.json").read_text()))
    model = load_lm(tmp_path / "o" / "model.safetensors", cfg)
    assert model.dtype == mx.float32
    params = dict(tree_flatten(model.parameters()))
    assert mx.array_equal(params["text_linear.weight"], ref["text_linear.weight"]).item()
    # The default stays bf16, as published; asking for a dtype at load time still works.
    assert load_lm(tmp_path / "o" / "model.safetensors", cfg, mx.bfloat16).dtype == mx.bfloat16
    with pytest.raises(ConvertError, match="unquantized"):
        convert(tmp_path / "f32.safetensors", tmp_path / "q", bits=4, dtype="f32", log=lambda m: None)


# ---------------------------------------------------------------------------------------------------------
# Kyutai's config.json through the command


def test_cli_converts_kyutais_test_lm_model_and_it_scores_like_the_reference(tmp_path):
    """moshi/tests/test_lm.py's arguments written as Kyutai's config.json (LayerNorm with bias, sin positions, a
    plain GELU temporal FFN, depformer_gating silu, low-rank depformer embeddings, schedule [0, 1, 1]): the issue's
    `missing tensor depformer.layers.0.gating.0.linear1.weight` case. Converted by the command, loaded by load_lm,
    scored against the float64 NumPy reference."""
    cfg = variant_config("kyutai_test_lm")
    rng = np.random.default_rng(7)
    weights = pytorch_checkpoint(cfg, rng)
    assert "depformer.layers.0.gating.0.linear_in.weight" in weights and "transformer.layers.0.linear1.weight" in weights
    src, cfg_path, out = tmp_path / "test_lm_model.safetensors", tmp_path / "config.json", tmp_path / "mlx"
    mx.save_safetensors(str(src), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    cfg_path.write_text(json.dumps(cfg))
    assert main([str(src), str(out), "--config", str(cfg_path), "--dtype", "f32", "--no-progress"]) == 0
    model = load_lm(out / "model.safetensors", LmConfig.from_dict(json.loads((out / "config.json").read_text())))
    c = model.config
    assert (c.transformer.norm, c.transformer.positional_embedding, c.transformer.gating) == ("layer_norm", "sin", False)
    assert c.depformer.gating and c.depformer.hidden_dim == 2 * 16 // 3 and c.depformer_low_rank_embeddings == 8
    seq = delayed_sequence(cfg, rng)
    f32 = {k: v.astype(np.float32).astype(np.float64) for k, v in weights.items()}
    want_text, want_audio = numpy_lm.forward(f32, cfg, seq)
    text, audio = model.forward(mx.array(seq)[None])
    assert np.abs(np.array(text[0]) - want_text).max() <= 1e-5
    assert np.abs(np.array(audio[0]) - want_audio).max() <= 1e-5


@pytest.mark.parametrize("extra,words", [
    ({"cross_attention": True}, "cross_attention=True"),
    ({"conditioners": {"d": {"type": "tensor", "tensor": {"dim": 4}}}, "fuser": {"sum": ["d"]}}, "conditioners.d.type"),
    ({"fuser": {"prepend": ["d"]}}, "fuser.prepend"),
    ({"some_new_option": 2}, "'some_new_option' is not known"),
])
def test_cli_refuses_an_unsupported_config_key_before_reading_the_checkpoint(tmp_path, capsys, extra, words):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_heads": 4, "depformer_num_heads": 4, "context": 100, **extra}))
    src = tmp_path / "in.safetensors"
    src.write_bytes(b"not a checkpoint: the config is refused before this file is opened")
    assert main([str(src), str(tmp_path / "o"), "--config", str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --config: ") and words in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_conditioners_must_match_the_config(tmp_path, tiny_sources):
    """Conditioner tables in the weights need their declaration (possible values) in --config, size for size."""
    _, arrays = tiny_sources["current"]
    with_table = dict(arrays)
    with_table["condition_provider.conditioners.description.embed.weight"] = mx.zeros((32, 16), dtype=mx.bfloat16)
    with_table["condition_provider.conditioners.description.output_proj.weight"] = mx.zeros((256, 16), dtype=mx.bfloat16)
    path = tmp_path / "cond.safetensors"
    mx.save_safetensors(str(path), with_table)
    with pytest.raises(ConvertError, match="the checkpoint has conditioner 'description': pass --config"):
        convert(path, tmp_path / "a", log=lambda m: None)
    lut = {"n_bins": 31, "dim": 16, "tokenizer": "noop", "possible_values": ["very_bad", "very_good"],
           "learn_padding": False}
    base = {"num_heads": 4, "depformer_num_heads": 4, "context": 100, "delays": [0, 0, 2, 0, 2], "gating": "silu",
            "positional_embedding": "rope", "depformer_pos_emb": "none", "fuser": {"sum": ["description"]}}
    wrong = {**base, "conditioners": {"description": {"type": "lut", "lut": {**lut, "n_bins": 5}}}}
    with pytest.raises(ConvertError, match=r"conditioners.description: the checkpoint's table is 32 x 16"):
        convert(path, tmp_path / "b", config=wrong, log=lambda m: None)
    good = {**base, "conditioners": {"description": {"type": "lut", "lut": lut}}}
    out = convert(path, tmp_path / "c", config=good, bits=4, log=lambda m: None)
    model = load_lm(out, LmConfig.from_dict(json.loads((tmp_path / "c" / "config.json").read_text())))
    assert model.config.is_conditioned
    # The tiny tables stay unquantized (their width is below any group size), as Kyutai keeps them in float.
    table = model.condition_provider.conditioners["description"]
    assert type(table.embed) is nn.Embedding and type(table.output_proj) is nn.Linear
    assert isinstance(model.text_linear, nn.QuantizedLinear)
    assert model.condition({"description": "very_good"}).shape == (1, 1, 256)
