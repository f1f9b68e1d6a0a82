"""Tests of the --demo stand-ins: random Mimi checkpoint, stand-in tokenizer, asset cache."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.model_files import stand_ins as demo
from tests.helpers.shared import find_manifests as _find_manifests

MANIFEST = _find_manifests() / "mimi.json"


@pytest.fixture(scope="session")
def random_mimi(tmp_path_factory):
    return demo.write_random_mimi(tmp_path_factory.mktemp("demo-mimi") / "mimi.safetensors", seed=0)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    return demo.write_stand_in_tokenizer(tmp_path_factory.mktemp("demo-tok") / "tok.model")


# --------------------------------------------------------------------------------------------------
# Mimi
# --------------------------------------------------------------------------------------------------


def test_layout_counts():
    layout = demo.mimi_tensor_layout()
    assert len(layout) == 318
    assert sum(int(np.prod(s)) for s in layout.values()) == 96_151_393


@pytest.mark.skipif(not MANIFEST.exists(), reason="shared Mimi manifest not available")
def test_layout_matches_published_manifest():
    manifest = json.loads(MANIFEST.read_text())["tensors"]
    layout = demo.mimi_tensor_layout()
    assert list(layout) == list(manifest)  # same names, same order
    for name, spec in manifest.items():
        assert spec["dtype"] == "float32", name
        assert tuple(spec["shape"]) == layout[name], name


def test_random_mimi_file_matches_layout(random_mimi):
    from safetensors import safe_open

    layout = demo.mimi_tensor_layout()
    with safe_open(str(random_mimi), "np") as f:
        keys = set(f.keys())
        assert keys == set(layout)
        names = ("encoder.model.0.conv.conv.weight", "quantizer.rvq_rest.vq.layers.30._codebook.cluster_usage")
        for name in names:
            t = f.get_tensor(name)
            assert t.dtype == np.float32 and t.shape == layout[name]
        assert (f.get_tensor("quantizer.rvq_first.vq.layers.0._codebook.cluster_usage") > 0).all()
    assert demo.is_valid_mimi_file(random_mimi)
    assert oct(os.stat(random_mimi).st_mode & 0o777) == oct(0o644)


def test_random_mimi_loads_in_rustymimi(random_mimi):
    rustymimi = pytest.importorskip("rustymimi", reason="rustymimi is not installed (no wheel for this Python?)")
    for k in (8, 32):
        tok = rustymimi.Tokenizer(str(random_mimi), num_codebooks=k)
        rng = np.random.default_rng(0)
        codes = tok.encode_step((0.1 * rng.standard_normal((1, 1, 1920))).astype(np.float32))
        assert codes.shape == (1, k, 1) and (codes < 2048).all()
        pcm = tok.decode_step(codes)
        assert pcm.shape == (1, 1, 1920) and np.isfinite(pcm).all()
        del tok


def test_truncated_mimi_is_invalid(tmp_path, random_mimi):
    bad = tmp_path / "bad.safetensors"
    with open(random_mimi, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    assert not demo.is_valid_mimi_file(bad)
    assert not demo.is_valid_mimi_file(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def test_stand_in_tokenizer_has_a_piece_for_every_id(tokenizer_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    assert sp.get_piece_size() == 32000
    pieces = [sp.id_to_piece(i) for i in range(32000)]
    assert all(pieces) and len(set(pieces)) == 32000
    # the real tokenizer's conventions: 0 unknown, 3 padding (both skipped by the app)
    assert sp.unk_id() == 0 and sp.pad_id() == 3 and pieces[0] == "<unk>" and pieces[3] == "<pad>"
    assert sp.is_unknown(0) and sp.is_control(3)
    assert sp.bos_id() == 1 and sp.eos_id() == 2
    # ordinary ids are word-like pieces that decode to text
    assert pieces[4].startswith("\u2581") and sp.id_to_piece(31000).strip()
    text = sp.decode([4, 5, 1234])
    assert text and text == text.strip() and len(text.split()) == 3
    assert sp.decode([3]) == ""
    assert demo.is_valid_tokenizer_file(tokenizer_path)


def test_stand_in_tokenizer_other_size(tmp_path):
    import sentencepiece as spm

    path = demo.write_stand_in_tokenizer(tmp_path / "small.model", vocab_size=1000)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == 1000 and sp.pad_id() == 3
    with pytest.raises(ValueError):
        demo.write_stand_in_tokenizer(tmp_path / "tiny.model", vocab_size=10)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def test_demo_assets_create_reuse_repair(tmp_path, monkeypatch, capsys, random_mimi, tokenizer_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    # Seed the cache with the session's files (hard links: no second 385 MB write in the common path).
    os.link(random_mimi, cache / demo.MIMI_FILE)
    os.link(tokenizer_path, cache / demo.TOKENIZER_FILE)
    monkeypatch.setenv("MOSHI_MLX_DEMO_DIR", str(cache))
    assert demo.default_cache_dir() == cache

    assets = demo.demo_assets()
    assert assets.mimi_path == cache / demo.MIMI_FILE and assets.tokenizer_path == cache / demo.TOKENIZER_FILE
    assert assets.mimi_path.stat().st_ino == Path(random_mimi).stat().st_ino  # reused, not rewritten
    assert assets.tokenizer_path.stat().st_ino == Path(tokenizer_path).stat().st_ino

    # A truncated file (as from an old interrupted writer) is replaced; the missing tokenizer recreated.
    broken = cache / "broken"
    with open(random_mimi, "rb") as f:
        broken.write_bytes(f.read(1000))
    os.replace(broken, cache / demo.MIMI_FILE)
    (cache / demo.TOKENIZER_FILE).unlink()
    assets = demo.demo_assets(cache)
    assert demo.is_valid_mimi_file(assets.mimi_path) and demo.is_valid_tokenizer_file(assets.tokenizer_path)
    assert sorted(p.name for p in cache.iterdir()) == sorted([demo.MIMI_FILE, demo.TOKENIZER_FILE])
    assert demo.is_valid_mimi_file(random_mimi)  # the hard-linked original was not touched
    assert capsys.readouterr() == ("", "")


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("MOSHI_MLX_DEMO_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    assert demo.default_cache_dir() == Path("~/.cache/moshi_mlx/demo").expanduser()


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    """Stand-ins are written through outputs.atomic_output: interrupted once written, the old file stays."""
    import contextlib

    from moshi_mlx import outputs

    @contextlib.contextmanager
    def interrupted_after_writing(path):
        with outputs.atomic_output(path) as tmp:
            yield tmp
            assert tmp.stat().st_size > 0
            raise KeyboardInterrupt

    target = tmp_path / "tok.model"
    target.write_bytes(b"old")
    monkeypatch.setattr(demo, "atomic_output", interrupted_after_writing)
    with pytest.raises(KeyboardInterrupt):
        demo.write_stand_in_tokenizer(target, vocab_size=100)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_stand_in_is_versioned_so_an_old_quiet_cache_is_regenerated(random_mimi, tmp_path):
    from moshi_mlx.model_files.checkpoint import read_tensor_infos

    assert demo.is_current_stand_in(random_mimi)
    assert read_tensor_infos(random_mimi)[1]["version"] == demo.STAND_IN_VERSION
    assert not demo.is_current_stand_in(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------------
# Hibiki stand-in repos
# --------------------------------------------------------------------------------------------------


def _safetensors_size(tensors: dict[str, tuple[tuple[int, ...], int]]) -> int:
    """Bytes of a safetensors file holding these (shape, bytes per element) tensors, as MLX wrote the published
    files (compact JSON header, names sorted, no metadata entry, padded to 8 bytes)."""
    header, offset = {}, 0
    for name in sorted(tensors):
        shape, width = tensors[name]
        size = int(np.prod(shape)) * width
        header[name] = {"data_offsets": [offset, offset + size], "dtype": "BF16", "shape": list(shape)}
        offset += size
    length = len(json.dumps(header, separators=(",", ":")))
    return 8 + length + (-length % 8) + offset


def test_hibiki_1b_layout_is_the_published_file_to_the_byte():
    """Our model built from Hibiki 1B's config has exactly the tensors of kyutai/hibiki-1b-mlx-bf16: the same
    safetensors size as its hibiki-mlx-dc2cf5a5@80.safetensors, 3,600,043,224 bytes (a lazy model: no memory)."""
    from mlx.utils import tree_flatten

    from moshi_mlx.models.config import LmConfig
    from moshi_mlx.models.lm import Lm

    model = Lm(LmConfig.from_dict(demo.HIBIKI_CONFIGS["1b"]))
    tensors = {name: (tuple(a.shape), 2) for name, a in tree_flatten(model.parameters())}
    assert _safetensors_size(tensors) == 3_600_043_224


@pytest.mark.parametrize("size", ["1b", "2b"])
def test_stand_in_repo_is_a_repo_as_published_in_a_hub_cache(tmp_path, random_mimi, size):
    """config.json names every file; the weights have the config's layout in bf16; the cache is the hub's."""
    from huggingface_hub import try_to_load_from_cache

    from moshi_mlx.model_files.checkpoint import build_model, expected_layout, read_tensor_infos
    from moshi_mlx.models.config import LmConfig

    config = demo.tiny_hibiki_config(size, text_card=120)
    folder = demo.write_stand_in_repo(tmp_path / "repo", config, mimi_source=random_mimi)
    written = json.loads((folder / "config.json").read_text())
    assert written == config
    tensors, _ = read_tensor_infos(folder / config["moshi_name"])
    layout = expected_layout(build_model(LmConfig.from_dict(config)))
    assert {k: (t.shape, t.dtype) for k, t in tensors.items()} == {k: (s, "BF16") for k, (s, _) in layout.items()}
    assert any(k.startswith("condition_provider.") for k in tensors)  # the description conditioner's table
    assert demo.is_valid_tokenizer_file(folder / config["tokenizer_name"], 120)
    assert (folder / config["mimi_name"]).stat().st_ino == Path(random_mimi).stat().st_ino  # linked, not copied
    snapshot = demo.cache_stand_in_repo(tmp_path / "hub", demo.HIBIKI_REPOS[size], folder)
    for name in ("config.json", config["moshi_name"], config["mimi_name"], config["tokenizer_name"]):
        hit = try_to_load_from_cache(demo.HIBIKI_REPOS[size], name, cache_dir=str(tmp_path / "hub"))
        assert hit == str(snapshot / name), name
