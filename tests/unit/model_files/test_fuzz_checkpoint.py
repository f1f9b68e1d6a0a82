"""Fuzzing (hypothesis, bounded: see tests/helpers/fuzz.py) of the checkpoint loader: a tiny LM's safetensors
file with its header length, its JSON header (as bytes, and as JSON with dtypes, shapes and offsets changed) or
its body corrupted, cut short or extended. `load_lm` must load it or refuse it with one WeightsError line, never
raise anything else or hang (the deadline)."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moshi_mlx.errors import MoshiError
from moshi_mlx.model_files.checkpoint import build_model, load_lm, save_lm
from moshi_mlx.models.config import LmConfig, TransformerConfig
from tests.helpers.fuzz import CHECKPOINT_EXAMPLES, flipped, fuzz_settings


def micro() -> LmConfig:
    """A model of a few hundred KB: a corrupted copy per example stays cheap to write and load."""
    return LmConfig(
        transformer=TransformerConfig(d_model=64, num_heads=2, num_layers=1, dim_feedforward=128, context=16),
        depformer=TransformerConfig(d_model=64, num_heads=2, num_layers=1, dim_feedforward=128, context=4,
                                    positional_embedding="none"),
        text_in_vocab_size=65, text_out_vocab_size=64, audio_vocab_size=65, audio_codebooks=4,
        generated_codebooks=2, audio_delays=(0, 1, 0, 1),
    )


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> bytes:
    mx.random.seed(0)
    model = build_model(micro(), None)
    mx.eval(model.parameters())
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_lm(model, path)
    return path.read_bytes()


def split(data: bytes) -> tuple[int, dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    n, header, body = split(data)
    how = draw(st.sampled_from(["length", "header-bits", "header-json", "body", "cut", "grow"]))
    if how == "length":
        value = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, n - 16), n + 16)))
        return struct.pack("<Q", value) + data[8:]
    if how == "header-bits":
        return data[:8] + draw(flipped(data[8 : 8 + n], max_flips=4)) + body
    if how == "header-json":
        names = sorted(k for k in header if k != "__metadata__")
        for _ in range(draw(st.integers(1, 3))):
            entry = header[draw(st.sampled_from(names))]
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            if field == "dtype":
                entry["dtype"] = draw(st.sampled_from(["BF16", "F16", "F32", "F64", "U32", "I8", "BOOL", "X", ""]))
            elif field == "shape":
                entry["shape"] = draw(st.lists(st.integers(0, 2**40), max_size=4))
            else:
                entry["data_offsets"] = draw(st.lists(st.integers(0, 2**40), min_size=2, max_size=2))
        if draw(st.booleans()):
            header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
        return join(header, body)
    if how == "body":
        return data[: 8 + n] + draw(flipped(body, max_flips=16))
    if how == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    return data + draw(st.binary(min_size=1, max_size=64))


@fuzz_settings(CHECKPOINT_EXAMPLES)
@given(data=st.data())
def test_a_corrupted_checkpoint_loads_or_is_one_line(tiny_file, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    path.write_bytes(data.draw(corrupted(tiny_file)))
    try:
        load_lm(path, micro())
    except MoshiError as e:
        line = str(e)
        assert line and "\n" not in line and "Traceback" not in line, line


def test_the_uncorrupted_file_loads(tiny_file, tmp_path):
    (tmp_path / "m.safetensors").write_bytes(join(*split(tiny_file)[1:]))  # split and join keep a good file good
    load_lm(tmp_path / "m.safetensors", micro())
