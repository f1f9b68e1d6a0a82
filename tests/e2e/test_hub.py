"""Model file resolution against a stand-in Hugging Face hub.

No real hub is reachable here. `FakeHub` is a small HTTP server speaking the parts of the hub protocol that
huggingface_hub uses (HEAD/GET /{repo}/resolve/{rev}/{file} with X-Repo-Commit/ETag headers, the
/api/models/{repo}/tree/{rev} listing, X-Error-Code on 404s), so the real hf_hub_download / list_repo_files /
cache / offline code paths run unchanged: tests point huggingface_hub at it (HF_ENDPOINT) with a private
HF_HOME cache, then go offline (HF_HUB_OFFLINE=1) or point at dead endpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import mlx.core as mx
import numpy as np
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import utils as hf_utils

from moshi_mlx.cli.flags import add_model_args
from moshi_mlx.errors import MoshiError
from moshi_mlx.model_files.checkpoint import (
    Quantization,
    build_model,
    resolve_model,
    save_lm,
)
from moshi_mlx.model_files.hub import (
    DEFAULT_REPOS,
    MIMI_NAME,
    MOSHI_NAMES,
    TOKENIZER_NAME,
    pytorch_layout_repo,
)
from moshi_mlx.model_files import personaplex
from moshi_mlx.model_files.personaplex import LayoutDims
from moshi_mlx.model_files.source import ModelSource
from moshi_mlx.models.config import LmConfig, TransformerConfig, config_tiny
from tests.helpers.family import pytorch_checkpoint, variant_config

Resolved = namedtuple("Resolved", "moshi mimi tokenizer lm_config repo quantize")


def resolve_model_files(progress: bool = False, **source) -> Resolved:
    """The one resolution path (hub finds, loading checks), flattened for comparisons."""
    r = resolve_model(ModelSource(**source), progress=progress)
    return Resolved(r.files.moshi, r.files.mimi, r.files.tokenizer, r.files.lm_config, r.repo, r.quantize)


# ---------------------------------------------------------------------------------------------------------
# stand-in files

TINY = LmConfig(
    transformer=TransformerConfig(d_model=256, num_heads=4, num_layers=1, dim_feedforward=1024, context=16),
    depformer=TransformerConfig(
        d_model=256, num_heads=4, num_layers=1, dim_feedforward=1024, context=1, positional_embedding="none"
    ),
    text_in_vocab_size=101,
    text_out_vocab_size=100,
    audio_vocab_size=33,
    audio_codebooks=2,
    generated_codebooks=1,
    audio_delays=(0, 1),
)


#: PersonaPlex's layout (16 depformer steps, PyTorch names) at sizes that resolve in a blink.
PERSONAPLEX_DIMS = LayoutDims(dim=256, num_layers=1, hidden=704, text_card=100, card=32, dep_dim=256, dep_layers=1,
                              dep_hidden=704)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, bytes]:
    """name -> bytes of every stand-in file a repo may hold."""
    from moshi_mlx.model_files.stand_ins import (
        write_random_pytorch,
        write_random_voice_presets,
        write_stand_in_tokenizer,
        write_voices_archive,
    )

    root = tmp_path_factory.mktemp("assets")
    out: dict[str, bytes] = {}
    mx.random.seed(0)
    for bits in (None, 8, 4):
        model = build_model(TINY, None if bits is None else Quantization(bits, {8: 64, 4: 32}[bits]))
        path = root / MOSHI_NAMES[bits]
        save_lm(model, path)
        out[MOSHI_NAMES[bits]] = path.read_bytes()
    mimi = root / "mimi.safetensors"
    mx.save_safetensors(
        str(mimi),
        {
            "encoder.model.0.conv.conv.weight": mx.zeros((4, 1, 7)),
            "decoder.model.0.conv.conv.weight": mx.zeros((4, 4, 7)),
            "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum": mx.ones((8, 4)),
        },
    )
    out[MIMI_NAME] = mimi.read_bytes()
    out[TOKENIZER_NAME] = write_stand_in_tokenizer(root / "tok.model", vocab_size=120).read_bytes()
    out["config.json"] = json.dumps(TINY.to_kyutai_dict()).encode()
    pytorch = root / "pytorch.safetensors"  # a text-only STT model in Kyutai's PyTorch names (float)
    weights = pytorch_checkpoint(variant_config("stt_text_only"), np.random.default_rng(0))
    mx.save_safetensors(str(pytorch), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    out["pytorch.safetensors"] = pytorch.read_bytes()
    write_random_pytorch(root / "pp.safetensors", personaplex.layout(PERSONAPLEX_DIMS))
    out["personaplex.safetensors"] = (root / "pp.safetensors").read_bytes()
    presets = write_random_voice_presets(root / "voices", config_tiny(), names=("NATF0", "VARM4"))
    out[personaplex.VOICES_ARCHIVE] = write_voices_archive(root / "voices.tgz", presets).read_bytes()
    return out


# ---------------------------------------------------------------------------------------------------------
# the stand-in hub


def _commit(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


class FakeHub:
    """Repos: {repo_id: {"refs": {name: commit}, "commits": {commit: {path: bytes}}}}."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.gated: set[str] = set()  # repos answering as a gated repo does to a caller without access
        self.log: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub._handle(self, body=False)

            def do_GET(self):
                hub._handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        commit = _commit(repo + ref + ",".join(sorted(files)) + str(len(self.repos)))
        entry = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        entry["refs"][ref] = commit
        entry["commits"][commit] = dict(files)
        return commit

    def requests_for(self, needle: str) -> list[tuple[str, str]]:
        return [r for r in self.log if needle in r[1]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- protocol
    def _reply(self, h, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _resolve(self, repo: str, rev: str):
        if repo in self.gated:
            return None, "GatedRepo"
        entry = self.repos.get(repo)
        if entry is None:
            return None, "RepoNotFound"
        commit = entry["refs"].get(rev, rev)
        if commit not in entry["commits"]:
            return None, "RevisionNotFound"
        return commit, None

    def _handle(self, h, body: bool) -> None:
        path = urlsplit(h.path).path
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("Range", ""))
        self.log.append((h.command + (" range" if ranged else ""), path))
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        if not parts:
            return self._reply(h, 200, {"Content-Type": "text/plain"}, b"stand-in hub", body)
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            repo, rev = f"{parts[2]}/{parts[3]}", parts[5]
            commit, err = self._resolve(repo, rev)
            if err:
                return self._reply(h, 401 if err == "GatedRepo" else 404, {"X-Error-Code": err}, b"{}", body)
            files = self.repos[repo]["commits"][commit]
            listing = [
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in files.items()
            ]
            data = json.dumps(listing).encode()
            return self._reply(h, 200, {"Content-Type": "application/json"}, data, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            commit, err = self._resolve(repo, rev)
            if err:
                return self._reply(h, 401 if err == "GatedRepo" else 404, {"X-Error-Code": err}, b"", body)
            files = self.repos[repo]["commits"][commit]
            if filename not in files:
                return self._reply(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b"", body)
            data = files[filename]
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }
            if ranged:  # a header read (huggingface_hub's parse_safetensors_file_metadata)
                first, last = int(ranged.group(1)), int(ranged.group(2))
                return self._reply(h, 206, headers, data[first : last + 1], body)
            return self._reply(h, 200, headers, data, body)
        return self._reply(h, 404, {}, b"", body)


@pytest.fixture(scope="module")
def fake_hub(assets):
    hub = FakeHub()
    common = {MIMI_NAME: assets[MIMI_NAME], TOKENIZER_NAME: assets[TOKENIZER_NAME]}
    cfg = {"config.json": assets["config.json"]}
    hub.add("kyutai/moshiko-mlx-q4", {**common, **cfg, "model.q4.safetensors": assets["model.q4.safetensors"]})
    hub.add("kyutai/moshiko-mlx-q8", {**common, **cfg, "model.q8.safetensors": assets["model.q8.safetensors"]})
    # Like the published bf16 repo: no config.json.
    hub.add("kyutai/moshiko-mlx-bf16", {**common, "model.safetensors": assets["model.safetensors"], "README.md": b"hi"})
    old_cfg = json.dumps({**TINY.to_kyutai_dict(), "context": 8}).encode()
    q4 = {"model.q4.safetensors": assets["model.q4.safetensors"]}
    hub.add("kyutai/moshika-mlx-q4", {**common, "config.json": old_cfg, **q4}, ref="v0")
    hub.add("kyutai/moshika-mlx-q4", {**common, **cfg, **q4})
    named = json.dumps(
        {**TINY.to_kyutai_dict(), "moshi_name": "weights-v2.safetensors", "mimi_name": "codec.safetensors",
         "tokenizer_name": "spm.model"}
    ).encode()
    hub.add(
        "someone/custom",
        {"config.json": named, "weights-v2.safetensors": assets["model.q8.safetensors"],
         "codec.safetensors": assets[MIMI_NAME], "spm.model": assets[TOKENIZER_NAME]},
    )
    hub.add(
        "someone/multi",
        {**common, **cfg, "model.safetensors": assets["model.safetensors"], **q4},
    )
    hibiki_named = json.dumps(  # like the published config.json: no model_type
        {**{k: v for k, v in TINY.to_kyutai_dict().items() if k != "model_type"},
         "moshi_name": "hibiki-mlx-dc2cf5a5@80.safetensors",
         "mimi_name": "mimi-dbaa9758@125.safetensors", "tokenizer_name": "tokenizer_spm_48k_multi6_2.model"}
    ).encode()
    hub.add(  # published in bf16 only, every file named by config.json
        "kyutai/hibiki-1b-mlx-bf16",
        {"config.json": hibiki_named, "hibiki-mlx-dc2cf5a5@80.safetensors": assets["model.safetensors"],
         "mimi-dbaa9758@125.safetensors": assets[MIMI_NAME], "tokenizer_spm_48k_multi6_2.model": assets[TOKENIZER_NAME]},
    )
    stt = {**variant_config("stt_text_only"), "moshi_name": "model.safetensors", "mimi_name": MIMI_NAME,
           "tokenizer_name": TOKENIZER_NAME}
    pytorch_files = {"config.json": json.dumps(stt).encode(), "model.safetensors": assets["pytorch.safetensors"],
                     **common}
    hub.add("kyutai/stt-1b-en_fr-candle", pytorch_files)  # PyTorch layout, and its name says so
    hub.add("someone/stt-mirror", pytorch_files)  # the same files under a name that does not say
    plain = json.dumps(variant_config("stt_text_only")).encode()  # no file names: the standard ones
    hub.add("someone/stt-plain", {**pytorch_files, "config.json": plain})
    hub.add("someone/empty", {"README.md": b"nothing here"})
    # PersonaPlex's file plan: Kyutai's names, its checkpoint in PyTorch layout (16 depformer steps, at stand-in
    # sizes), voices.tgz, and a config.json that is no LM config (NVIDIA's server downloads it only to count).
    hub.add(personaplex.REPO, {**common, "config.json": b'{"architectures": ["PersonaPlex"]}',
                               "model.safetensors": assets["personaplex.safetensors"],
                               personaplex.VOICES_ARCHIVE: assets[personaplex.VOICES_ARCHIVE]})
    hub.add("someone/gated", {**common, "model.safetensors": assets["model.safetensors"]})
    hub.gated.add("someone/gated")
    hub.add("someone/no-mimi", {**cfg, TOKENIZER_NAME: assets[TOKENIZER_NAME], **q4})
    yield hub
    hub.close()


@pytest.fixture
def hub_env(fake_hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the stand-in hub with a fresh, private cache."""
    cache = tmp_path / "hf" / "hub"
    _point_at(monkeypatch, fake_hub.url)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("MOSHI_MLX_HUB_TIMEOUT", "2")
    fake_hub.log.clear()
    return cache


def _point_at(monkeypatch, endpoint: str) -> None:
    """What HF_ENDPOINT does when set before huggingface_hub is imported (it derives both at import)."""
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def _offline(monkeypatch) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------------------------------------------------
# repo selection and quantization


@pytest.mark.parametrize("q", [4, 8, None])
def test_default_repo_per_quantize(hub_env, fake_hub, q):
    files = resolve_model_files(quantize=q, progress=False)
    assert files.repo == DEFAULT_REPOS[q]
    assert files.quantize == q
    assert files.moshi.name == MOSHI_NAMES[q] and files.moshi.is_file()
    assert files.mimi.name == MIMI_NAME and files.tokenizer.name == TOKENIZER_NAME
    assert str(files.moshi).startswith(str(hub_env))  # in the hub cache
    if q is None:
        assert files.lm_config is None  # that repo has no config.json
    else:
        assert LmConfig.from_dict(files.lm_config) == TINY


def test_hf_repo_without_q_takes_quantization_from_the_checkpoint(hub_env):
    files = resolve_model_files(hf_repo="kyutai/moshika-mlx-q4", progress=False)
    assert files.repo == "kyutai/moshika-mlx-q4" and files.quantize == 4
    assert files.moshi.name == "model.q4.safetensors"


def test_q_disagreeing_with_repo_is_one_line_naming_the_flag(hub_env, fake_hub):
    with pytest.raises(MoshiError) as e:
        resolve_model_files(quantize=8, hf_repo="kyutai/moshika-mlx-q4", progress=False)
    msg = _one_line(e)
    assert "kyutai/moshika-mlx-q4" in msg and "model.q4.safetensors" in msg and "-q 4" in msg
    assert not fake_hub.requests_for("model.q4.safetensors")  # decided from the listing, nothing downloaded
    with pytest.raises(MoshiError) as e:
        resolve_model_files(quantize=4, hf_repo="kyutai/moshiko-mlx-bf16", progress=False)
    assert "drop -q" in _one_line(e)


def test_config_json_names_the_files(hub_env):
    files = resolve_model_files(hf_repo="someone/custom", progress=False)
    assert (files.moshi.name, files.mimi.name, files.tokenizer.name) == (
        "weights-v2.safetensors", "codec.safetensors", "spm.model",
    )
    assert files.quantize == 8  # read from the checkpoint: the name does not say
    with pytest.raises(MoshiError) as e:
        resolve_model_files(quantize=4, hf_repo="someone/custom", progress=False)
    assert "8-bit" in _one_line(e) and "-q 8" in str(e.value)


@pytest.mark.parametrize("q", [None, 4, 8])
def test_a_bf16_only_repo_takes_q_as_quantizing_at_load(hub_env, fake_hub, q):
    r = resolve_model(ModelSource(hf_repo="kyutai/hibiki-1b-mlx-bf16", quantize=q), progress=False)
    assert (r.files.moshi.name, r.files.mimi.name, r.files.tokenizer.name) == (
        "hibiki-mlx-dc2cf5a5@80.safetensors", "mimi-dbaa9758@125.safetensors", "tokenizer_spm_48k_multi6_2.model")
    assert r.checkpoint.bits is None and r.quantize_at_load == q and r.quantize == q
    assert r.config.model_type == "hibiki"  # the repo is known: its config.json need not say


@pytest.mark.parametrize("q", [None, 4, 8])
def test_a_pytorch_layout_repo_takes_q_as_quantizing_at_load(hub_env, fake_hub, q):
    """A `-candle` repo publishes float weights in PyTorch's layout: -q picks that file and quantizes it at load."""
    r = resolve_model(ModelSource(hf_repo="kyutai/stt-1b-en_fr-candle", quantize=q), progress=False)
    assert r.files.moshi.name == "model.safetensors" and r.checkpoint.layout == "pytorch"
    assert r.quantize_at_load == q and r.quantize == q and r.config.text_only


@pytest.mark.parametrize("q", [4, 8])
@pytest.mark.parametrize("repo", ["someone/stt-mirror", "someone/stt-plain"])  # config.json names it, or not
def test_a_pytorch_layout_repo_is_known_by_its_header_under_any_name(hub_env, fake_hub, q, repo):
    """The same files under a name that does not say: the float file's header (a ranged read, not the download)
    shows PyTorch's layout, so -q is taken as quantizing at load; an MLX bf16 file is still refused before it is
    downloaded."""
    weights = f"{repo}/resolve/main/model.safetensors"
    r = resolve_model(ModelSource(hf_repo=repo, quantize=q), progress=False)
    assert r.checkpoint.layout == "pytorch" and r.quantize_at_load == q
    methods = [m for m, _ in fake_hub.requests_for(weights)]
    assert methods.index("GET range") < methods.index("GET")  # the header was read before the download
    fake_hub.log.clear()
    with pytest.raises(MoshiError) as e:
        resolve_model_files(quantize=q, hf_repo="kyutai/moshiko-mlx-bf16", progress=False)
    assert "drop -q" in _one_line(e)
    assert [m for m, _ in fake_hub.requests_for("moshiko-mlx-bf16/resolve/main/model.safetensors")] == ["GET range"]


def test_a_cached_pytorch_layout_file_takes_q_offline(hub_env, fake_hub, monkeypatch):
    resolve_model(ModelSource(hf_repo="someone/stt-mirror"), progress=False)  # downloaded once
    _offline(monkeypatch)
    r = resolve_model(ModelSource(hf_repo="someone/stt-mirror", quantize=4), progress=False)
    assert r.checkpoint.layout == "pytorch" and r.quantize_at_load == 4


@pytest.mark.parametrize("repo, pytorch", [
    ("kyutai/stt-1b-en_fr-candle", True), ("kyutai/stt-2.6b-en-candle", True), ("kyutai/moshiko-pytorch-bf16", True),
    ("kyutai/moshiko-candle-q8", True), ("kyutai/stt-1b-en_fr-mlx", False), ("kyutai/moshiko-mlx-q4", False),
    ("someone/candlelight-mlx", False), ("candle-org/model-mlx", False), (None, False),
])
def test_pytorch_layout_repo_names(repo, pytorch):
    assert pytorch_layout_repo(repo) is pytorch


def test_repo_with_several_quantizations(hub_env):
    assert resolve_model_files(hf_repo="someone/multi", progress=False).quantize is None
    assert resolve_model_files(hf_repo="someone/multi", quantize=4, progress=False).quantize == 4


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"hf_repo": "someone/empty"}, r"someone/empty has no Moshi weights .*--moshi-weights"),
        ({"hf_repo": "someone/missing"}, r"someone/missing: repository not found .*--hf-repo"),
        ({"hf_repo": "kyutai/moshika-mlx-q4", "revision": "nope"}, r"revision 'nope' not found .*--revision"),
        ({"hf_repo": "someone/no-mimi"}, rf"someone/no-mimi has no file {MIMI_NAME}; pass --mimi-weights PATH"),
        ({"hf_repo": "bad repo id!"}, r"--hf-repo 'bad repo id!'"),
    ],
)
def test_hub_errors_are_one_line(hub_env, kwargs, pattern):
    with pytest.raises(MoshiError, match=pattern) as e:
        resolve_model_files(progress=False, **kwargs)
    _one_line(e)


def test_missing_file_is_reported_before_any_large_download(hub_env, fake_hub):
    with pytest.raises(MoshiError, match="--mimi-weights"):
        resolve_model_files(hf_repo="someone/no-mimi", progress=False)
    assert fake_hub.requests_for("/api/models/someone/no-mimi/tree/")
    assert not [r for r in fake_hub.requests_for("someone/no-mimi/resolve/") if r[0] == "GET" and "model" in r[1]]


def test_revision_pinning(hub_env, fake_hub):
    old = resolve_model_files(hf_repo="kyutai/moshika-mlx-q4", revision="v0", progress=False)
    new = resolve_model_files(hf_repo="kyutai/moshika-mlx-q4", progress=False)
    assert old.lm_config["context"] == 8 and new.lm_config["context"] == TINY.transformer.context
    commit = fake_hub.repos["kyutai/moshika-mlx-q4"]["refs"]["v0"]
    assert f"snapshots/{commit}/" in old.moshi.as_posix()
    assert fake_hub.requests_for("/kyutai/moshika-mlx-q4/resolve/v0/model.q4.safetensors")
    by_commit = resolve_model_files(hf_repo="kyutai/moshika-mlx-q4", revision=commit, progress=False)
    assert by_commit.moshi == old.moshi


# ---------------------------------------------------------------------------------------------------------
# local overrides


@pytest.fixture
def local_files(tmp_path, assets) -> dict[str, Path]:
    out = {}
    for key, name in [("moshi", "model.q4.safetensors"), ("bf16", "model.safetensors"), ("mimi", MIMI_NAME),
                      ("tokenizer", TOKENIZER_NAME), ("lm_config", "config.json")]:
        out[key] = tmp_path / "local" / name
        out[key].parent.mkdir(exist_ok=True)
        out[key].write_bytes(assets[name])
    return out


def test_all_local_files_need_no_hub(local_files, monkeypatch, tmp_path):
    # A dead endpoint and an empty cache: nothing may touch the network.
    _point_at(monkeypatch, "http://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    files = resolve_model_files(
        moshi_weights=local_files["moshi"], mimi_weights=local_files["mimi"], tokenizer=local_files["tokenizer"],
        lm_config=local_files["lm_config"], progress=False,
    )
    assert files.moshi == local_files["moshi"] and files.repo is None and files.quantize == 4
    assert LmConfig.from_dict(files.lm_config) == TINY
    assert not (tmp_path / "empty").exists()


def test_local_moshi_weights_with_hub_for_the_rest(hub_env, local_files, fake_hub):
    files = resolve_model_files(moshi_weights=local_files["moshi"], progress=False)
    assert files.moshi == local_files["moshi"] and files.quantize == 4
    assert files.repo == DEFAULT_REPOS[4]  # mimi/tokenizer come from the repo matching the local weights
    assert not fake_hub.requests_for("model.q4.safetensors")
    with pytest.raises(MoshiError) as e:
        resolve_model_files(moshi_weights=local_files["moshi"], quantize=8, progress=False)
    msg = _one_line(e)
    assert "--moshi-weights" in msg and "4-bit" in msg and "-q 4" in msg


def test_local_override_errors(tmp_path, local_files, assets):
    pt = tmp_path / "pytorch.safetensors"
    mx.save_safetensors(str(pt), {"text_emb.weight": mx.zeros((4, 4)), "emb.0.weight": mx.zeros((4, 4))})
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(assets["model.q4.safetensors"][: len(assets["model.q4.safetensors"]) // 3])
    junk = tmp_path / "junk.txt"
    junk.write_text("just some text\n" * 10)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{'dim': 4096,}")
    list_json = tmp_path / "list.json"
    list_json.write_text("[1, 2]")
    incomplete_cfg = tmp_path / "incomplete.json"
    incomplete_cfg.write_text(json.dumps({"dim": 256}))
    cases = [
        ({"moshi_weights": tmp_path / "nope.safetensors"}, r"^--moshi-weights .*nope\.safetensors: no such file$"),
        ({"moshi_weights": tmp_path}, r"^--moshi-weights .*: is a directory"),
        ({"moshi_weights": empty}, r"^--moshi-weights .*: file is empty$"),
        ({"moshi_weights": truncated}, r"^--moshi-weights .*: file is truncated"),
        ({"moshi_weights": junk}, r"^--moshi-weights .*: not a safetensors file"),
        ({"moshi_weights": local_files["mimi"]}, r"not a Moshi LM checkpoint .*use --mimi-weights"),
        ({"moshi_weights": pt}, r"PyTorch-layout checkpoint that cannot be read: missing tensor"),
        ({"mimi_weights": local_files["moshi"]}, r"^--mimi-weights .*: not Mimi codec weights .*use --moshi-weights"),
        ({"mimi_weights": junk}, r"^--mimi-weights .*: not a safetensors file"),
        ({"tokenizer": junk}, r"^--tokenizer .*: not a SentencePiece model"),
        ({"tokenizer": local_files["moshi"]}, r"^--tokenizer .*: not a SentencePiece model"),
        ({"tokenizer": empty}, r"^--tokenizer .*: file is empty$"),
        ({"lm_config": bad_json}, r"^--lm-config .*: invalid JSON"),
        ({"lm_config": list_json}, r"^--lm-config .*: expected a JSON object"),
        ({"lm_config": incomplete_cfg}, r"^--lm-config .*: not a usable LM config"),
        ({"lm_config": local_files["moshi"]}, r"^--lm-config .*: not a JSON file"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(MoshiError, match=pattern) as e:
            resolve_model_files(progress=False, **kwargs)
        _one_line(e)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads everything")
def test_unreadable_local_file(local_files):
    p = local_files["tokenizer"]
    p.chmod(0)
    try:
        with pytest.raises(MoshiError, match=r"^--tokenizer .*: cannot be read"):
            resolve_model_files(tokenizer=p, progress=False)
    finally:
        p.chmod(0o644)


# ---------------------------------------------------------------------------------------------------------
# offline, unreachable, cached


def test_offline_not_cached_names_repo_file_and_flag_fast(hub_env, fake_hub, monkeypatch):
    _offline(monkeypatch)
    t0 = time.monotonic()
    with pytest.raises(MoshiError) as e:
        resolve_model_files(quantize=4, progress=False)
    assert time.monotonic() - t0 < 2
    msg = _one_line(e)
    assert "kyutai/moshiko-mlx-q4" in msg and "model.q4.safetensors" in msg and "--moshi-weights PATH" in msg
    assert "HF_HUB_OFFLINE" in msg and str(hub_env) in msg
    assert fake_hub.log == []
    # With the weights given locally, the next missing file is named with its own flag.
    with pytest.raises(MoshiError) as e:
        resolve_model_files(hf_repo="someone/custom", progress=False)
    assert "someone/custom" in _one_line(e) and "--moshi-weights" in str(e.value)


def test_offline_names_every_missing_file_at_once_and_the_demo(hub_env, local_files, monkeypatch):
    """With only --moshi-weights given, Mimi and the tokenizer are named together (it took one run each)."""
    _offline(monkeypatch)
    with pytest.raises(MoshiError) as e:
        resolve_model_files(moshi_weights=local_files["moshi"], progress=False)
    msg = _one_line(e)
    assert f"{MIMI_NAME} and {TOKENIZER_NAME} are not in the Hugging Face cache" in msg
    assert "download them, or pass --mimi-weights PATH and --tokenizer PATH; or try --demo" in msg


def test_offline_q_the_repo_name_contradicts_is_not_a_download_problem(hub_env, monkeypatch):
    """`-q 4 --hf-repo kyutai/moshika-mlx-q8` offline: no download would give a q4 file, so none is suggested."""
    _offline(monkeypatch)
    with pytest.raises(MoshiError) as e:
        resolve_model_files(quantize=4, hf_repo="kyutai/moshika-mlx-q8", progress=False)
    msg = _one_line(e)
    assert msg == ("kyutai/moshika-mlx-q8 holds 8-bit weights (by its name), so it has no model.q4.safetensors: "
                   "use -q 8 (or drop -q), or choose another --hf-repo")


def test_cache_serves_everything_offline(hub_env, fake_hub, monkeypatch):
    online = {q: resolve_model_files(quantize=q, progress=False) for q in (4, None)}
    custom = resolve_model_files(hf_repo="someone/custom", progress=False)
    _offline(monkeypatch)
    fake_hub.log.clear()
    for q, files in online.items():
        assert resolve_model_files(quantize=q, progress=False) == files
    # -q omitted: the cached snapshot decides the file, and the checkpoint the bits.
    assert resolve_model_files(hf_repo="kyutai/moshiko-mlx-q4", progress=False) == online[4]
    assert resolve_model_files(hf_repo="someone/custom", progress=False) == custom
    with pytest.raises(MoshiError) as e:
        resolve_model_files(hf_repo="kyutai/moshiko-mlx-q4", quantize=8, progress=False)
    assert "caches model.q4.safetensors" in _one_line(e) and "-q 4" in str(e.value)
    assert fake_hub.log == []


def test_unreachable_endpoint_falls_back_to_cache_or_fails_fast(hub_env, fake_hub, monkeypatch):
    cached = resolve_model_files(quantize=4, progress=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    _point_at(monkeypatch, dead)
    t0 = time.monotonic()
    assert resolve_model_files(quantize=4, progress=False) == cached
    with pytest.raises(MoshiError) as e:
        resolve_model_files(quantize=8, progress=False)
    assert time.monotonic() - t0 < 5
    msg = _one_line(e)
    assert f"cannot reach {dead}" in msg and "kyutai/moshiko-mlx-q8" in msg and "model.q8.safetensors" in msg
    assert "--moshi-weights PATH" in msg


def test_silent_endpoint_times_out_instead_of_hanging(hub_env, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (kernel backlog) but never answers
    try:
        _point_at(monkeypatch, f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setenv("MOSHI_MLX_HUB_TIMEOUT", "0.5")
        t0 = time.monotonic()
        pattern = r"kyutai/moshiko-mlx-bf16: nothing of this repo is in the Hugging Face cache .* cannot reach .*"
        with pytest.raises(MoshiError, match=pattern + r".*--moshi-weights PATH") as e:
            resolve_model_files(progress=False)
        assert time.monotonic() - t0 < 4
        _one_line(e)
    finally:
        listener.close()


# ---------------------------------------------------------------------------------------------------------
# the whole thing through the real environment variables, in fresh processes

_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from moshi_mlx.errors import MoshiError
    from moshi_mlx.model_files.hub import ModelSource
    from moshi_mlx.model_files.checkpoint import resolve_model
    t0 = time.monotonic()
    try:
        r = resolve_model(ModelSource(quantize={q}, hf_repo={repo!r}))
        f = r.files
    except MoshiError as e:
        print(json.dumps({{"error": str(e), "seconds": time.monotonic() - t0}}))
        sys.exit(3)
    print(json.dumps({{"moshi": str(f.moshi), "mimi": str(f.mimi), "tokenizer": str(f.tokenizer),
                       "quantize": r.quantize, "repo": f.repo, "config": f.lm_config is not None}}))
    """
)


def _run(tmp_path, env_extra: dict, q=None, repo=None) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update({"HF_HOME": str(tmp_path / "hf_home"), **env_extra})
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(q=q, repo=repo)], env=env, capture_output=True, text=True, timeout=60
    )
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stderr


def test_env_driven_download_then_offline(fake_hub, tmp_path):
    """HF_ENDPOINT + HF_HOME: real downloads (progress bars on) into the cache; then HF_HUB_OFFLINE=1 serves them."""
    # TQDM_POSITION=-1: the hub's bars are on but hidden when stderr is not a terminal; this shows them.
    rc, online, err = _run(tmp_path, {"HF_ENDPOINT": fake_hub.url, "TQDM_POSITION": "-1"}, repo="kyutai/moshika-mlx-q4")
    assert rc == 0, err
    assert online["quantize"] == 4 and online["config"] and online["repo"] == "kyutai/moshika-mlx-q4"
    assert online["moshi"].startswith(str(tmp_path / "hf_home" / "hub" / "models--kyutai--moshika-mlx-q4"))
    assert "model.q4.safetensors" in err  # the hub's progress bar
    offline_env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    rc, offline, err = _run(tmp_path, offline_env, repo="kyutai/moshika-mlx-q4")
    assert rc == 0, err
    assert offline == online
    rc, missing, _ = _run(tmp_path, {"HF_HUB_OFFLINE": "1"}, q=8)
    assert rc == 3 and missing["seconds"] < 2
    assert "kyutai/moshiko-mlx-q8" in missing["error"] and "model.q8.safetensors" in missing["error"]
    assert "--moshi-weights" in missing["error"] and "\n" not in missing["error"]


# ---------------------------------------------------------------------------------------------------------
# command line


def test_add_model_args(hub_env, capsys):
    parser = add_model_args(argparse.ArgumentParser(prog="moshi"))
    args = parser.parse_args(["-q", "4", "--hf-repo", "kyutai/moshika-mlx-q4", "--revision", "v0"])
    assert (args.quantize, args.hf_repo, args.revision) == (4, "kyutai/moshika-mlx-q4", "v0")
    assert [args.moshi_weights, args.mimi_weights, args.tokenizer, args.lm_config] == [None] * 4
    resolved = resolve_model(ModelSource.from_args(args), progress=False)
    assert resolved.files.lm_config["context"] == 8 and resolved.config.transformer.context == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["-q", "3"])
    assert "invalid choice: 3" in capsys.readouterr().err


def test_progress_flag_restores_global_state(hub_env):
    assert not hf_utils.are_progress_bars_disabled()
    resolve_model_files(quantize=4, progress=False)
    assert not hf_utils.are_progress_bars_disabled()


# ---------------------------------------------------------------------------------------------------------
# PersonaPlex (nvidia/personaplex-7b-v1): its file plan, and a gated repo without a token


def test_personaplex_file_plan(hub_env, fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MOSHI_MLX_VOICE_CACHE", str(tmp_path / "voices"))
    r = resolve_model(ModelSource(hf_repo=personaplex.REPO, quantize=4), progress=False)
    assert r.files.moshi.name == "model.safetensors" and r.checkpoint.layout == "pytorch"
    assert r.quantize_at_load == 4  # float PyTorch weights: -q 4 quantizes them while loading
    assert r.files.voices is not None and r.files.voices.name == personaplex.VOICES_ARCHIVE
    # Moshi 7B's config (known here), kept at 8 depformer steps; the repo's config.json is never fetched
    assert r.config.generated_codebooks == 8 and r.config.transformer.d_model == 4096
    assert r.config.model_type == "personaplex"
    assert not fake_hub.requests_for(f"{personaplex.REPO}/resolve/main/config.json")
    from moshi_mlx.model_files.voice_archive import ready_voices
    from moshi_mlx.voices import list_voices

    folder = ready_voices(r.files.voices, log=print)
    assert list_voices(folder) == ["NATF0", "VARM4"]
    assert ready_voices(r.files.voices, log=print) == folder  # once: the second start finds it


def test_personaplex_offline_without_voices_still_resolves(hub_env, fake_hub, monkeypatch):
    resolve_model(ModelSource(hf_repo=personaplex.REPO), progress=False)  # caches everything
    cached = hub_env / ("models--" + personaplex.REPO.replace("/", "--"))
    for f in cached.rglob(personaplex.VOICES_ARCHIVE):
        f.unlink()
    _offline(monkeypatch)
    r = resolve_model(ModelSource(hf_repo=personaplex.REPO), progress=False)
    assert r.files.voices is None and "no preset voices" in r.files.voices_note
    assert "\n" not in r.files.voices_note


def test_gated_repo_without_a_token_says_how_to_get_access(hub_env):
    """The stand-in hub answers as the real one does for a gated repo (401, X-Error-Code: GatedRepo), so
    huggingface_hub raises its own GatedRepoError; the real hub cannot be reached from here."""
    with pytest.raises(MoshiError) as e:
        resolve_model_files(hf_repo="someone/gated", progress=False)
    line = _one_line(e)
    assert "gated repo" in line and "https://huggingface.co/someone/gated" in line
    assert "huggingface-cli login" in line and "HF_TOKEN" in line


def test_gated_error_from_a_download_function(monkeypatch, hub_env):
    """huggingface_hub's own GatedRepoError raised by a fake hf_hub_download (no hub is reachable here): the
    download path turns it into the same one line."""
    from huggingface_hub import utils as hf_utils

    from moshi_mlx.model_files import hub

    class Response:  # what the error reads of the hub's answer
        headers: dict[str, str] = {"X-Error-Code": "GatedRepo"}
        request = None
        status_code = 401

    def gated(*args, **kwargs):
        response = Response()
        raise hf_utils.GatedRepoError("Access to model nvidia/personaplex-7b-v1 is restricted", response=response)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", gated)
    with pytest.raises(MoshiError) as e:
        hub._Repo(personaplex.REPO, None).download("model.safetensors", "moshi")
    line = _one_line(e)
    assert line.startswith(f"{personaplex.REPO}: gated repo") and "HF_TOKEN" in line
