"""Smoke tests for moshi_mlx.benchmark on the tiny config (no timing assertions: machines differ)."""

import json
import math

import pytest

from moshi_mlx import benchmark


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_stats(s, n):
    assert s["n"] == n
    for key in ("median_ms", "p90_ms", "max_ms", "mean_ms", "min_ms"):
        assert _num(s[key]) and s[key] > 0, key
    assert s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["max_ms"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = ["--config", "tiny", "--dtype", "f32", "--steps", "3", "--warmup", "1",
            "--realtime-frames", "2", "--save-load", "--no-progress", "--json", str(path)]
    assert benchmark.main(argv) == 0
    return json.loads(path.read_text())


def test_json_describes_machine_and_model(tiny_run):
    assert tiny_run["schema"] == benchmark.SCHEMA
    m = tiny_run["machine"]
    for key in ("os", "chip", "machine", "python", "mlx_version", "mlx_device"):
        assert isinstance(m[key], str) and m[key], key
    assert m["mlx_device"] in ("cpu", "gpu")
    model = tiny_run["model"]
    assert model["config"] == "tiny" and model["dtype"] == "f32" and model["source"] == "random"
    assert model["quantization"] is None and model["compute_dtype"] == "float32"
    assert model["params"] > 1_000_000 and model["weights_gb"] > 0
    s = tiny_run["settings"]
    assert s["steps"] == 3 and s["warmup"] == 1 and s["start_position"] == s["context"] == 3000


def test_json_has_sane_timings(tiny_run):
    _check_stats(tiny_run["lm_step"], 3)
    split = tiny_run["lm_split"]
    _check_stats(split["temporal"], 3)
    _check_stats(split["depformer"], 3)
    assert 0 < split["depformer_share"] < 1
    _check_stats(tiny_run["mimi"]["encode"], 3)
    _check_stats(tiny_run["mimi"]["decode"], 3)
    assert tiny_run["mimi"]["random_weights"] is True
    seq = tiny_run["pipeline"]["sequential"]
    _check_stats(seq["frame"], 3)
    assert set(seq["stages"]) == {"encode", "lm", "decode"}
    runner = tiny_run["pipeline"]["runner"]
    assert runner["dropped"] == 0 and runner["frames_out"] == 4 and not runner["timed_out"]
    assert _num(runner["ms_per_frame"]) and runner["ms_per_frame"] > 0
    rt = tiny_run["pipeline"]["realtime"]
    assert rt["frames_out"] + rt["dropped"] == rt["frames_in"] == 3
    assert _num(tiny_run["rtf"]) and tiny_run["rtf"] > 0
    assert isinstance(tiny_run["keeps_up"], bool)
    assert tiny_run["verdict"].startswith("this ") and "real time" in tiny_run["verdict"]


def test_json_has_load_and_memory(tiny_run):
    load = tiny_run["load"]
    for key in ("lm_s", "load_lm_s", "save_s", "mimi_s"):
        assert _num(load[key]) and load[key] >= 0, key
    mem = tiny_run["memory"]
    weights = tiny_run["model"]["weights_gb"]
    assert mem["mlx_peak_gb"] >= weights * 0.9
    assert mem["rss_peak_gb"] > 0 and mem["mlx_peak_steps_gb"] > 0


def test_long_session_reports_three_windows(tmp_path):
    path = tmp_path / "long.json"
    argv = ["--long", "--context", "8", "--steps", "30", "--warmup", "1", "--no-progress", "--json", str(path)]
    assert benchmark.main(argv) == 0
    res = json.loads(path.read_text())
    long = res["long"]
    assert long["steps"] == 30 and res["model"]["config"] == "tiny"
    for name in ("start", "middle", "end"):
        w = long[name]
        _check_stats(w, long["window"])
        assert w["mlx_active_mb"] > 0
    assert long["start"]["first_step"] == 0 and long["end"]["last_step"] == 29
    assert long["mlx_active_growth_mb"] <= 1.0 and long["flat_memory"]


def test_time_lm_steps_for_compare_reference():
    res = benchmark.time_lm_steps("tiny", "q4", 3, 1, 0)
    for key in ("median_ms", "p90_ms", "max_ms", "steps_per_s", "peak_memory_gb"):
        assert _num(res[key]) and res[key] > 0, key
    assert res["config"] == "tiny" and res["dtype"] == "q4"


def test_verdict_lines():
    line, ok = benchmark.verdict(52.0, "-q 4", "this Mac")
    assert ok and "keeps up" in line and "35% headroom" in line and "-q 4" in line
    line, ok = benchmark.verdict(128.0, "bf16", "this Mac")
    assert ok is False and "1.6× more speed" in line
    line, ok = benchmark.verdict(60.0, "bf16", "this Mac", dropped=3)
    assert ok is False and "dropped 3 frames" in line


def test_bad_arguments_fail_with_one_line(capsys):
    assert benchmark.main(["--steps", "3"]) == 2  # no model chosen
    assert "choose a model" in capsys.readouterr().err
    assert benchmark.main(["--config", "tiny", "--moshi-weights", "/nonexistent.safetensors"]) == 2
