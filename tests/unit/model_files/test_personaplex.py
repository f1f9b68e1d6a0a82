"""PersonaPlex's checkpoint layout (checked name by name at full size against Kyutai's 7B manifests, no data) and
its voices archive unpacked into the cache."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest

from moshi_mlx.errors import MoshiError
from moshi_mlx.model_files import personaplex
from moshi_mlx.model_files.depformer_steps import keep_steps
from moshi_mlx.model_files.voice_archive import unpack_voices
from moshi_mlx.models.pytorch import plan_conversion
from tests.helpers.pytorch_names import legacy

STEP = re.compile(r"(gating|linears|depformer_in|depformer_emb)\.(\d+)\.")


def _manifest(manifests_dir, name: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((manifests_dir / name).read_text())
    return {k: tuple(v["shape"]) for k, v in data["tensors"].items()}


def test_full_layout_is_kyutais_7b_plus_depformer_steps_8_to_15(manifests_dir):
    """Built independently from Kyutai's 7B PyTorch manifest: its older stacked attention form, the stacked
    depformer attention with 16 row blocks instead of 8, and every per-step tensor of steps 8-15 added."""
    kyutai = legacy(_manifest(manifests_dir, "moshi-7b-pytorch-bf16.json"))
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in kyutai.items():
        if name.startswith("depformer.layers.") and ".self_attn." in name:
            shape = (shape[0] * 2, shape[1])  # 16 steps' row blocks, not 8
        expected[name] = shape
        m = STEP.search(name)
        if m is None:
            continue
        k = int(m.group(2))
        last = 6 if m.group(1) == "depformer_emb" else 7  # depformer_emb.k serves step k + 1
        if k == last:
            for extra in range(last + 1, last + 9):
                expected[name[: m.start(2)] + str(extra) + name[m.end(2):]] = shape
    got = personaplex.layout()
    assert len(got) == 475 and got == expected


def test_keeping_8_steps_of_the_full_layout_gives_the_published_mlx_7b(manifests_dir):
    plan = keep_steps(plan_conversion(personaplex.layout()), 8)
    mlx = _manifest(manifests_dir, "moshi-7b-mlx-bf16.json")
    assert {p.name: tuple(p.shape) for p in plan.pieces} == mlx


def _archive(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_voices_archive_unpacks_flat_once(tmp_path):
    archive = tmp_path / "voices.tgz"
    _archive(archive, {"voices/NATF0.pt": b"a", "voices/VARM4.pt": b"b", "../../escape.pt": b"c", "voices/.hidden": b""})
    folder = unpack_voices(archive, tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["NATF0.pt", "VARM4.pt", "escape.pt"]
    assert folder.parent == tmp_path / "cache" and not (tmp_path / "escape.pt").exists()
    (folder / "NATF0.pt").write_bytes(b"kept")
    assert unpack_voices(archive, tmp_path / "cache") == folder and (folder / "NATF0.pt").read_bytes() == b"kept"


@pytest.mark.parametrize("content", [b"not a tar at all", b""])
def test_a_bad_voices_archive_is_one_line_and_leaves_nothing(tmp_path, content):
    archive = tmp_path / "voices.tgz"
    if content:
        archive.write_bytes(content)
    else:
        _archive(archive, {})
    with pytest.raises(MoshiError) as e:
        unpack_voices(archive, tmp_path / "cache")
    assert "\n" not in str(e.value) and str(archive) in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_torch_presets_without_torch_say_the_command_that_converts_them(tmp_path, monkeypatch):
    """NVIDIA's presets are torch files; with no torch importable (made so here, whatever is installed) the
    load says, in one line, the command that converts them once, and the model still loads."""
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    from moshi_mlx.model_files.voice_archive import ready_voices

    archive = tmp_path / "voices.tgz"
    _archive(archive, {"voices/NATF0.pt": b"torch bytes"})
    lines: list[str] = []
    folder = ready_voices(archive, lines.append, tmp_path / "cache")
    assert (folder / "NATF0.pt").exists() and len(lines) == 1 and "\n" not in lines[0]
    assert f"python -m moshi_mlx.convert --voices {archive} --out {folder}" in lines[0] and "torch" in lines[0]


def _tiny_personaplex_files(folder):
    """PersonaPlex's layout at small sizes, a stand-in tokenizer and a file with Mimi's names (never decoded)."""
    import mlx.core as mx

    from moshi_mlx.model_files.stand_ins import write_random_pytorch, write_stand_in_tokenizer

    dims = personaplex.LayoutDims(dim=64, num_layers=1, hidden=176, text_card=100, card=32, dep_dim=64,
                                  dep_layers=1, dep_hidden=176)
    weights = write_random_pytorch(folder / "model.safetensors", personaplex.layout(dims))
    mimi = folder / "mimi.safetensors"
    mx.save_safetensors(str(mimi), {"encoder.model.0.conv.conv.weight": mx.zeros((4, 1, 7)),
                                    "decoder.model.0.conv.conv.weight": mx.zeros((4, 4, 7)),
                                    "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum": mx.ones((8, 4))})
    tokenizer = write_stand_in_tokenizer(folder / "tok.model", vocab_size=100)
    config = {"dim": 64, "text_card": 100, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 32,
              "num_heads": 2, "num_layers": 1, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
              "context": 32, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
              "positional_embedding": "rope", "depformer_dim": 64, "depformer_dim_feedforward": 264,
              "depformer_num_heads": 2, "depformer_num_layers": 1, "depformer_layer_scale": None,
              "depformer_multi_linear": True, "depformer_context": 8, "depformer_max_period": 10000,
              "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
              "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]}
    return weights, mimi, tokenizer, config


def test_local_personaplex_weights_are_known_by_their_layout(tmp_path):
    """Local weights with no model_type anywhere: a 16-step depformer for a model generating 8 of 16 codebooks
    is PersonaPlex's layout (the web UI then offers a role and a voice); the steps kept at load are 8."""
    from moshi_mlx.model_files.checkpoint import load_lm, resolve_model
    from moshi_mlx.model_files.source import ModelSource

    weights, mimi, tokenizer, config = _tiny_personaplex_files(tmp_path)
    r = resolve_model(ModelSource(moshi_weights=weights, mimi_weights=mimi, tokenizer=tokenizer, lm_config=config))
    assert r.config.model_type == personaplex.MODEL_TYPE and r.checkpoint.layout == "pytorch"
    assert len(load_lm(r.checkpoint, r.config).depformer.slices) == 8
    named = resolve_model(ModelSource(moshi_weights=weights, mimi_weights=mimi, tokenizer=tokenizer,
                                      lm_config={**config, "model_type": "moshi"}))
    assert named.config.model_type == "moshi"  # a config that says what it is wins
