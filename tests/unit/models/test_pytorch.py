"""The PyTorch -> MLX name plan and the config read off the shapes, checked on the 7B manifests (no data)."""

from __future__ import annotations

import json
import re

import pytest

from moshi_mlx.model_files.convert import expected_specs, output_specs
from moshi_mlx.models.config import LmConfig, config_v0_1
from moshi_mlx.models.pytorch import ConvertError, plan_conversion
from moshi_mlx.models.pytorch_config import build_config
from tests.helpers.pytorch_names import legacy as _legacy

ST_DTYPE = {"bfloat16": "BF16", "uint32": "U32", "float32": "F32"}


@pytest.fixture
def manifest(manifests_dir):
    def read(name: str) -> dict:
        return json.loads((manifests_dir / name).read_text())

    return read


def _specs(manifest: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v["shape"]), ST_DTYPE[v["dtype"]]) for k, v in manifest["tensors"].items()}


# ---------------------------------------------------------------------------------------------------------
# the 7B mapping, on name -> shape dicts only (nothing allocated)


@pytest.mark.parametrize("legacy", [False, True], ids=["in_projs", "legacy_in_proj_weight"])
@pytest.mark.parametrize("bits,which", [(None, "bf16"), (8, "q8"), (4, "q4")])
def test_7b_mapping_matches_published_manifests(manifest, legacy, bits, which):
    pt = {k: tuple(v["shape"]) for k, v in manifest("moshi-7b-pytorch-bf16.json")["tensors"].items()}
    if legacy:
        pt = _legacy(pt)
        assert "depformer.layers.0.self_attn.in_proj_weight" in pt
        assert pt["depformer.layers.0.self_attn.in_proj_weight"] == (8 * 3 * 1024, 1024)
        assert pt["transformer.layers.0.self_attn.in_proj_weight"] == (3 * 4096, 4096)
    plan = plan_conversion(pt)
    assert plan.layout == "pytorch"
    got = output_specs(plan.pieces, bits)
    want = _specs(manifest(f"moshi-7b-mlx-{which}.json"))
    assert set(got) == set(want)
    assert got == want


def test_7b_param_count_difference_is_the_shared_depformer_norms(manifest):
    pt_manifest = manifest("moshi-7b-pytorch-bf16.json")
    mlx_manifest = manifest("moshi-7b-mlx-bf16.json")
    plan = plan_conversion({k: v["shape"] for k, v in pt_manifest["tensors"].items()})
    diff = mlx_manifest["logical_param_count"] - pt_manifest["param_count"]
    assert diff == 86016
    # Sources used more than once: exactly the depformer norms, copied into every slice.
    uses: dict[str, list[str]] = {}
    for p in plan.pieces:
        uses.setdefault(p.source, []).append(p.name)
    shared = {src: names for src, names in uses.items() if len(names) > 1}
    assert shared and all(re.fullmatch(r"depformer\.layers\.\d\.norm[12]\.alpha", s) for s in shared)
    assert len(shared) == 6 * 2
    extra = sum((len(names) - 1) * 1024 for names in shared.values())
    assert extra == diff == 7 * 6 * 2 * 1024
    # Everything else is used exactly once, and every source is used.
    assert set(uses) == set(pt_manifest["tensors"])


def test_7b_config_derived_from_shapes_is_config_v0_1_and_model_layout_agrees(manifest):
    pt = {k: v["shape"] for k, v in manifest("moshi-7b-pytorch-bf16.json")["tensors"].items()}
    plan = plan_conversion(pt)
    cfg, cfg_json, notes = build_config(plan.dims)
    assert cfg == config_v0_1()
    assert LmConfig.from_dict(cfg_json) == config_v0_1()
    assert cfg_json["dim"] == 4096 and cfg_json["dep_q"] == 8 and cfg_json["delays"][:3] == [0, 0, 1]
    assert any("num_heads=32" in n for n in notes)
    # The lead's model, built lazily, expects exactly what the plan writes (bf16 and q4).
    for bits in (None, 4):
        assert expected_specs(cfg, bits) == output_specs(plan.pieces, bits)


def test_7b_pytorch_config_overrides_are_accepted(manifest):
    """The PyTorch repo's own config (depformer_dim_feedforward 4224 etc.) describes the same model."""
    pt_manifest = manifest("moshi-7b-pytorch-bf16.json")
    plan = plan_conversion({k: v["shape"] for k, v in pt_manifest["tensors"].items()})
    cfg, cfg_json, notes = build_config(plan.dims, pt_manifest["config"])
    assert cfg.depformer.hidden_dim == 2816
    assert cfg.transformer.num_heads == 32 and not any("num_heads" in n for n in notes)
    assert expected_specs(cfg, None) == output_specs(plan.pieces, None)


def test_the_plan_refuses_what_it_cannot_map_in_one_line(manifest):
    """No file needed: quantized MLX, Mimi, unknown, incomplete and badly shaped name sets."""
    pt = {k: tuple(v["shape"]) for k, v in manifest("moshi-7b-pytorch-bf16.json")["tensors"].items()}
    broken = dict(pt)
    broken["linears.1.weight"] = (64, 1024)
    cases = [
        ({"text_emb.weight": (2, 2), "x.scales": (1, 1)}, "already quantized"),
        ({"encoder.a": (1,), "quantizer.b": (1,)}, "Mimi codec weights"),
        ({"model.embed_tokens.weight": (8, 8)}, "not a PyTorch Moshi LM checkpoint"),
        ({k: v for k, v in pt.items() if k != "out_norm.alpha"}, r"missing tensor out_norm\.alpha"),
        (broken, r"linears\.1\.weight has shape \[64, 1024\], expected \[2048, 1024\]"),
    ]
    for shapes, pattern in cases:
        with pytest.raises(ConvertError, match=pattern) as info:
            plan_conversion(shapes)
        assert "\n" not in str(info.value)


def test_stacked_attention_is_cut_into_one_row_block_per_step(manifest):
    pt = _legacy({k: tuple(v["shape"]) for k, v in manifest("moshi-7b-pytorch-bf16.json")["tensors"].items()})
    pieces = {p.name: p for p in plan_conversion(pt).pieces}
    step3 = pieces["depformer.slices.3.transformer.layers.0.self_attn.in_proj.weight"]
    assert (step3.source, step3.chunk) == ("depformer.layers.0.self_attn.in_proj_weight", (3, 8))
    temporal = pieces["transformer.layers.0.self_attn.in_proj.weight"]
    assert (temporal.source, temporal.chunk) == ("transformer.layers.0.self_attn.in_proj_weight", None)
