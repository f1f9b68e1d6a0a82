"""The sampling knobs: one table (settings.KNOBS), and every flag, query parser and metadata field agrees with it."""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moshi_mlx.net import protocol
from moshi_mlx.server.info import knobs_info, sampling_fields, server_info
from moshi_mlx.settings import KNOBS, EngineSettings, Knob, knob_values, with_knobs

ROOT = Path(__file__).resolve().parents[2]


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser (the ones that take sampling flags)."""
    from moshi_mlx import client, local, local_web, run_inference
    from moshi_mlx.benchmark import args as benchmark

    mods = {"local": local, "local_web": local_web, "client": client, "run_inference": run_inference,
            "benchmark": benchmark}
    return {name: mod.build_parser() for name, mod in mods.items()}


PARSERS = _parsers()


def _beyond(x: float | int, direction: float, kind: str) -> float | int:
    return x + (1 if direction > 0 else -1) if kind != "float" else math.nextafter(x, direction)


def _probes(knob: Knob) -> list[tuple[str, bool]]:
    """(text, accepted) at each bound and just beyond it."""
    b = knob.bounds
    low_in = _beyond(b.low, math.inf, knob.kind) if b.open_low else b.low
    low_out = b.low if b.open_low else _beyond(b.low, -math.inf, knob.kind)
    values = [(low_in, True), (low_out, False), (b.high, True), (_beyond(b.high, math.inf, knob.kind), False)]
    return [(repr(v), ok) for v, ok in values]


def _query_outcome(name: str, text: str) -> object:
    """The parsed value, or the server's error message."""
    try:
        return protocol.parse_query({name: text}).applied[name]
    except protocol.ParamError as e:
        return str(e)


def _flag_outcome(action: argparse.Action, text: str) -> object:
    try:
        return action.type(text)
    except argparse.ArgumentTypeError as e:
        return str(e)


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


NUMERIC = [k for k in KNOBS.values() if k.bounds is not None]
CASES = [(knob, text, ok) for knob in NUMERIC for text, ok in _probes(knob)]
NAME_CASES = [("very_good", True), (" bad ", True), ("", False), ("no spaces", False), ("x" * 65, False)]


def test_the_table_is_the_protocol():
    assert protocol.SUPPORTED_PARAMS == tuple(KNOBS) and len(KNOBS) == 16
    assert knob_values(EngineSettings()) == {k.name: k.default for k in KNOBS.values()}


@pytest.mark.parametrize("text,ok", NAME_CASES)
def test_condition_takes_a_name_on_every_path(text, ok):
    knob = KNOBS["condition"]
    got = _query_outcome("condition", text)
    if ok:
        assert got == text.strip() == knob.read(with_knobs(EngineSettings(), {"condition": got}))
    else:
        assert got == f"condition must be a condition name such as very_good, got {text.strip()!r}"
    for command, parser in PARSERS.items():
        assert _flag_outcome(_action(parser, "--condition"), text) == got, command


@pytest.mark.parametrize("knob,text,ok", CASES, ids=[f"{k.name}={t}" for k, t, _ in CASES])
def test_query_takes_exactly_the_bounds(knob, text, ok):
    got = _query_outcome(knob.name, text)
    if ok:
        assert got == knob.parse(text) and not isinstance(got, str)
    else:
        assert got == f"{knob.name} must be {knob.bounds.describe()}, got {text!r}"


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_command_flag_takes_exactly_the_bounds_with_the_servers_message(command):
    parser = PARSERS[command]
    for knob, text, ok in CASES:
        action = _action(parser, knob.flag)
        assert action.dest == knob.name
        assert _flag_outcome(action, text) == _query_outcome(knob.name, text), (command, knob.name, text)
        assert action.default is None  # left out: the model's default (lm_gen_config), else the table's


@pytest.mark.parametrize("knob,text,ok", CASES, ids=[f"{k.name}={t}" for k, t, _ in CASES])
def test_engine_settings_check_the_same_bounds(knob, text, ok):
    value = float(text) if knob.kind == "float" else int(text)
    if ok:
        assert knob.read(with_knobs(EngineSettings(), {knob.name: value})) == value
    else:
        with pytest.raises(ValueError, match=knob.bounds.describe()):
            with_knobs(EngineSettings(), {knob.name: value})


def test_metadata_reports_the_knobs_typed():
    at_high = {k.name: repr(k.bounds.high) for k in NUMERIC}
    described = protocol.parse_query(at_high).describe()
    info = server_info(described, "model.safetensors")
    fields = sampling_fields(described)
    assert set(fields) == {k.name for k in KNOBS.values() if k.kind in ("float", "int")}
    for name, value in fields.items():
        knob = KNOBS[name]
        assert info[name] == value == knob.bounds.high and type(value) is (float if knob.kind == "float" else int)


def test_api_info_serves_the_table():
    table = {k["name"]: k for k in knobs_info()}
    assert list(table) == list(KNOBS)
    for knob in NUMERIC:
        row = table[knob.name]
        b = knob.bounds
        assert (row["low"], row["high"], row["open_low"], row["kind"], row["default"]) == (
            b.low, b.high, b.open_low, knob.kind, knob.default)


def test_encode_query_round_trips():
    values = {"text_temperature": 100.0, "audio_topk": 0, "seed": 7, "pad_mult": None}
    query = protocol.encode_query(values)
    assert query == {"text_temperature": "100.0", "audio_topk": "0", "seed": "7", "text_seed": "7", "audio_seed": "7"}
    settings = protocol.parse_query(query).settings
    assert (settings.text.temperature, settings.audio.top_k, settings.seeds) == (100.0, 0, (7, 7))


def test_client_refuses_an_out_of_range_flag_before_connecting():
    server_says = _query_outcome("text_temperature", "150")
    with socket.socket() as listener:  # a server that would see any connection attempt
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        run = subprocess.run([sys.executable, "-m", "moshi_mlx.client", "--text-temperature", "150", url],
                             capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith(f"argument --text-temperature: {server_says}"), run.stderr


def test_client_sends_guidance_and_the_new_sampling_knobs():
    """The remote client's flags become the query a server parses back into the same settings."""
    from moshi_mlx import client
    from moshi_mlx.cli.flags import SAMPLING_PARAMS
    from moshi_mlx.net.address import chat_url, sampling_params

    args = client.build_parser().parse_args(
        ["--cfg-coef", "3", "--condition", "good", "--text-top-p", "0.9", "--audio-min-p", "0.05", "ws://h:1"])
    url = chat_url(args.url, sampling_params(**{name: getattr(args, name) for name in SAMPLING_PARAMS}))
    query = dict(url.query)
    assert query == {"cfg_coef": "3.0", "condition": "good", "text_top_p": "0.9", "audio_min_p": "0.05"}
    settings = protocol.parse_query(query).settings
    assert (settings.cfg_coef, settings.condition, settings.text.top_p, settings.audio.min_p) == (3.0, "good", 0.9, 0.05)
