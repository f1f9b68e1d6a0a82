"""The benchmark package on the tiny config: structure and sanity of what it reports, never timings."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx import benchmark
from moshi_mlx.audio.codec_choice import rustymimi_problem
from moshi_mlx.audio.frames import FRAMES_PER_MINUTE
from moshi_mlx.benchmark.long import long_session
from moshi_mlx.generate import LmGen, StepTimings
from moshi_mlx.model_files.stand_ins import demo_lm

ROOT = Path(__file__).resolve().parents[2]
STEPS, WARMUP = 3, 1


def _check_stats(s, n):
    assert s["n"] == n
    assert 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["max_ms"]
    assert s["min_ms"] <= s["mean_ms"] <= s["max_ms"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, demo_files):
    """The real command line in a subprocess, stderr a pipe (not a terminal)."""
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    cmd = [sys.executable, "-m", "moshi_mlx.benchmark", "--config", "tiny", "--dtype", "float32",
           "--steps", str(STEPS), "--warmup", str(WARMUP), "--realtime-frames", "2", "--json", str(path)]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "MOSHI_MLX_DEMO_DIR": str(demo_files.mimi_path.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(path.read_text()), proc.stdout, proc.stderr


def test_json_describes_machine_model_and_settings(cli_run):
    res, _, _ = cli_run
    assert res["schema"] == benchmark.SCHEMA
    m = res["machine"]
    for key in ("os", "chip", "machine", "python", "mlx_version"):
        assert isinstance(m[key], str) and m[key], key
    assert m["mlx_device"] in ("cpu", "gpu") and m["memory_gb"] > 0
    model = res["model"]
    assert model["source"] == "random" and model["config"] == "tiny" and model["label"].startswith("tiny float32")
    assert model["bits"] is None and model["compute_dtype"] == "float32"
    assert model["params"] > 1_000_000 and model["weights_gb"] > 0
    s = res["settings"]
    assert (s["steps"], s["warmup"], s["seed"], s["kv_bits"]) == (STEPS, WARMUP, 0, 8)  # the app's default KV cache, as the app would run
    assert s["start_position"] == s["context"] == 3000  # timed with the attention window full
    load = res["load"]
    assert load["load_s"] > 0 and load["write_random_s"] > 0 and load["file_gb"] > 0


def test_lm_step_is_the_real_step_with_its_own_halves(cli_run):
    res, _, _ = cli_run
    lm = res["lm"]
    _check_stats(lm["step"], STEPS)
    # Filled by LmGen's own timing hook (StepTimings), one entry per timed step.
    _check_stats(lm["temporal"], STEPS)
    _check_stats(lm["depformer"], STEPS)
    assert 0 < lm["depformer_share"] < 1 and lm["start_position"] == 3000
    assert lm["kv_cache_gb"] > 0


def test_a_model_without_conditioners_times_no_guidance(cli_run):
    res, stdout, _ = cli_run
    assert res["guidance"] is None and "CFG" not in stdout


def test_a_conditioned_config_times_the_step_with_guidance_off_and_on(tmp_path, demo_files):
    """--config hibiki-tiny: the step with cfg_coef 1 (one row) and 3 (two rows), each its own stats."""
    path = tmp_path / "hibiki.json"
    cmd = [sys.executable, "-m", "moshi_mlx.benchmark", "--config", "hibiki-tiny", "--dtype", "float32", "--lm-only",
           "--no-split", "--steps", str(STEPS), "--warmup", str(WARMUP), "--json", str(path)]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "MOSHI_MLX_DEMO_DIR": str(demo_files.mimi_path.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    g = json.loads(path.read_text())["guidance"]
    assert g["coef"] == 3.0 and g["cost"] == round(g["on"]["median_ms"] / g["off"]["median_ms"], 3)
    _check_stats(g["off"], STEPS)
    _check_stats(g["on"], STEPS)
    assert "LM step, CFG off (cfg_coef 1: one row)" in proc.stdout
    assert re.search(r"LM step, CFG on \(cfg_coef 3: two rows, x[\d.]+\)", proc.stdout), proc.stdout


def test_mimi_pipeline_and_verdict(cli_run):
    res, _, _ = cli_run
    _check_stats(res["mimi"]["encode"], STEPS)
    _check_stats(res["mimi"]["decode"], STEPS)
    pipe = res["pipeline"]
    _check_stats(pipe["sequential"]["frame"], STEPS)
    assert set(pipe["sequential"]["stages"]) == {"encode", "lm", "decode"}
    threaded = pipe["threaded"]
    assert threaded["frames_out"] == STEPS + WARMUP and threaded["dropped"] == 0 and not threaded["timed_out"]
    assert threaded["ms_per_frame"] > 0
    rt = pipe["realtime"]
    assert rt["paced"] and rt["frames_out"] + rt["dropped"] == rt["frames_in"] == 2 + min(WARMUP, 5)
    v = res["verdict"]
    assert v["basis"] == "threaded pipeline" and v["ms_per_frame"] == threaded["ms_per_frame"]
    assert v["rtf"] == pytest.approx(v["ms_per_frame"] / 80, abs=1e-3)
    assert v["line"].startswith("this ") and "real time at tiny float32" in v["line"]
    assert ("keeps up with" in v["line"]) == v["keeps_up"]


def test_memory_for_lm_alone_and_full_pipeline(cli_run):
    res, _, _ = cli_run
    mem = res["memory"]
    weights = res["model"]["weights_gb"]
    for phase in ("lm", "pipeline"):
        assert mem[phase]["mlx_peak_gb"] >= weights * 0.9, phase
        assert mem[phase]["rss_peak_gb"] >= mem[phase]["rss_end_gb"] > 0, phase
    assert mem["mlx_peak_gb"] >= max(mem["lm"]["mlx_peak_gb"], mem["pipeline"]["mlx_peak_gb"])
    assert mem["rss_peak_gb"] >= mem["pipeline"]["rss_peak_gb"] * 0.99  # ru_maxrss vs. sampled
    assert mem["kv_cache_gb"] == res["lm"]["kv_cache_gb"]
    # By part: Mimi's three instances are measured where they load (~0.38 GB each in f32), and the parts
    # add up to no more than the process's peak.
    if mem["mimi_in_mlx_gb"]:  # the MLX Mimi (rustymimi cannot be imported here): one copy, inside MLX
        assert mem["mimi_instances"] == 1 and 0.25 < mem["mimi_gb"] == mem["mimi_in_mlx_gb"] < 0.5
    else:
        assert mem["mimi_instances"] == 3 and 0.25 * 3 < mem["mimi_gb"] < 0.6 * 3
    assert mem["activations_gb"] >= 0 and mem["rest_gb"] >= 0
    parts = weights + mem["kv_cache_gb"] + mem["activations_gb"] + mem["mimi_gb"] + mem["rest_gb"]
    assert parts <= mem["rss_peak_gb"] + 0.01


def test_table_on_stdout_and_progress_lines_on_a_pipe(cli_run):
    res, out, err = cli_run
    assert "LM step (LmGen.step)" in out and "full pipeline (LM + Mimi both ways)" in out
    assert out.rstrip().splitlines()[-1] == "verdict : " + res["verdict"]["line"]
    # Not a terminal: tqdm's redraws arrive as whole lines, never as carriage returns.
    assert "\r" not in err
    n = STEPS + WARMUP
    for desc, total in (("LM step", n), ("LM step, halves timed", n), ("Mimi encode \\+ decode", 2 * n),
                        ("pipeline, threaded", n)):
        assert re.search(rf"^{desc}: 100%.*\b{total}/{total}\b", err, re.M), desc


def test_step_timings_hook_leaves_the_step_unchanged():
    lm = demo_lm()
    codes = np.random.default_rng(0).integers(0, lm.config.audio_card, size=(6, lm.config.user_codebooks))
    plain, timed = LmGen(lm, seed=7), LmGen(lm, seed=7)
    timed.timings = StepTimings()
    for c in codes:
        a, b = plain.submit(c), timed.submit(c)
        assert np.array_equal(a.raw_tokens, b.raw_tokens)
        a.result(), b.result()
    assert len(timed.timings.temporal_ms) == len(timed.timings.depformer_ms) == len(codes)
    assert all(t > 0 for t in timed.timings.temporal_ms + timed.timings.depformer_ms)
    assert plain.timings is None


def test_long_session_reports_windows(tmp_path, demo_files, monkeypatch):
    monkeypatch.setenv("MOSHI_MLX_DEMO_DIR", str(demo_files.mimi_path.parent))
    path = tmp_path / "long.json"
    argv = ["--long", "--context", "8", "--steps", "30", "--warmup", "1", "--no-progress", "--json", str(path)]
    assert benchmark.main(argv) == 0
    res = json.loads(path.read_text())
    long = res["long"]
    assert long["steps"] == 30 and not long["pipeline"] and res["model"]["config"] == "tiny"
    assert res["settings"]["start_position"] == 0 and res["settings"]["context"] == 8
    for name in ("start", "middle", "end"):
        _check_stats(long[name]["time"], long["window"])
        assert long[name]["mlx_active_mb"] > 0 and long[name]["rss_mb"] > 0
    assert long["start"]["first_step"] == 0 and long["end"]["last_step"] == 29
    assert long["mlx_active_growth_mb"] <= 1.0 and long["flat_memory"]  # past the 8-step window wrap
    assert long["minutes"] == []  # 30 steps never reach a minute of audio
    assert res["memory"]["lm"]["mlx_peak_gb"] > 0 and res["memory"]["pipeline"] is None


def test_long_session_takes_rss_at_minute_marks():
    steps = FRAMES_PER_MINUTE + 10
    long = long_session(lambda i: sum(range(3000)), steps, 2, pipeline=False)
    assert [(m.minute, m.step) for m in long.minutes] == [(1, FRAMES_PER_MINUTE)]
    assert long.minutes[0].rss_mb > 0 and long.end.last_step == steps - 1


def test_verdict_says_headroom_or_needed_speed():
    v = benchmark.verdict(52.0, "-q 4", "this Mac", "threaded pipeline")
    assert v.keeps_up and "keeps up with real time at -q 4 with 35% headroom" in v.line
    v = benchmark.verdict(288.0, "bf16", "this Mac", "threaded pipeline")
    assert not v.keeps_up and "needs 3.6x more speed" in v.line and v.rtf == 3.6
    v = benchmark.verdict(60.0, "bf16", "this Mac", "threaded pipeline", dropped=3)
    assert not v.keeps_up and "dropped 3 frames" in v.line
    v = benchmark.verdict(76.0, "bf16", "this Mac", "LM alone")
    assert v.keeps_up and "only just (5% headroom)" in v.line
    assert benchmark.pace(22.4) == "keeps up with 72% headroom"
    assert benchmark.pace(128.0) == "needs 1.6x more speed"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "3"], "choose a model"),
        (["--config", "tiny", "--moshi-weights", "x.safetensors"], "cannot be combined with --moshi-weights"),
        (["--demo", "--config", "tiny"], "--demo is its own model"),
        (["--config", "tiny", "--position", "soon"], "--position must be"),
        (["-q", "4", "--context", "8"], "--context N"),
    ],
)
def test_bad_flags_fail_with_one_line_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_unreadable_weights_fail_with_one_line(tmp_path, demo_files, capsys):
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not weights")
    argv = ["--moshi-weights", str(notes), "--mimi-weights", str(demo_files.mimi_path),
            "--tokenizer", str(demo_files.tokenizer_path), "--no-progress"]
    assert benchmark.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "notes.safetensors" in err[0]


def test_no_progress_also_silences_the_hubs_download_bars(monkeypatch, capsys):
    """--no-progress reaches the file finding, where the hub's download bars live (they showed anyway).
    The finding itself is stood in (no hub here): it records what it was asked and stops the run."""
    from moshi_mlx.benchmark import loaded
    from moshi_mlx.model_files.hub import HubError

    asked = []

    def finding(source, progress=True):
        asked.append(progress)
        raise HubError("stopped here by the test")

    monkeypatch.setattr(loaded, "resolve_model", finding)
    assert benchmark.main(["-q", "4", "--no-progress"]) == 1
    assert benchmark.main(["-q", "4"]) == 1
    assert asked == [False, True]
    assert capsys.readouterr().err.count("error: stopped here by the test") == 2


def test_device_gpu_without_a_gpu_fails_with_one_line(monkeypatch, capsys):
    """A machine without a GPU backend is the user's fact, not a crash: exit 1, one line, no type name."""
    import mlx.core as mx

    monkeypatch.setattr(mx, "is_available", lambda device: False)  # as on a CPU-only MLX build
    assert benchmark.main(["--config", "tiny", "--device", "gpu", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device gpu: ") and "Error" not in err[0]


def test_time_lm_steps_for_compare_reference(demo_files, monkeypatch):
    monkeypatch.setenv("MOSHI_MLX_DEMO_DIR", str(demo_files.mimi_path.parent))
    res = benchmark.time_lm_steps("tiny", "q4", 2, 1, 0)
    for key in ("median_ms", "p90_ms", "max_ms", "steps_per_s", "peak_memory_gb", "weights_gb", "load_s"):
        assert res[key] > 0, key
    assert res["config"] == "tiny" and res["dtype"] == "q4"
    with pytest.raises(ValueError, match="unknown precision"):
        benchmark.time_lm_steps("tiny", "q3", 2, 1, 0)


def test_memory_budget_is_applied_as_in_the_app(tmp_path, demo_files):
    """--max-memory: the plan the app would make (here: 4-bit KV and a shorter window) is what gets timed."""
    path = tmp_path / "budget.json"
    cmd = [sys.executable, "-m", "moshi_mlx.benchmark", "--config", "tiny", "--dtype", "float32", "--max-memory", "0.5",
           "--steps", "2", "--warmup", "1", "--lm-only", "--no-split", "--no-progress", "--json", str(path)]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "MOSHI_MLX_DEMO_DIR": str(demo_files.mimi_path.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "memory: budget 0.50 GB" in proc.stderr and "window shortened 3000 ->" in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "memory: budget" in ln)
    if rustymimi_problem() is None:
        assert "; Mimi " in line and "GB on top (3 rustymimi instances)" in line  # the rest of the picture
    else:  # the MLX Mimi runs instead, inside the budget
        assert "; MLX Mimi 0.3" in line
    s = json.loads(path.read_text())["settings"]
    assert s["kv_bits"] == 4 and s["context"] < 3000 and s["start_position"] == s["context"]


def test_reference_agreement_finds_ref_python_from_the_callers_folder(tmp_path):
    """`--ref-python ../refvenv/bin/python`, as the README writes it, is the caller's path (it was looked up from
    the script's temporary folder). A stand-in interpreter records that it ran; a missing one is a usage error."""
    fake = tmp_path / "refvenv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\nexit 3\n")
    fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    script = str(ROOT / "benchmarks" / "reference_agreement.py")

    def agreement(ref: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, "--ref-python", ref], cwd=work, capture_output=True, text=True,
                              timeout=120, check=False)

    r = agreement("../refvenv/bin/python")
    assert (tmp_path / "ran").exists() and r.returncode == 1, r.stderr
    assert r.stderr.strip().endswith("failed with exit status 3"), r.stderr
    r = agreement("../nope/bin/python")
    assert r.returncode == 2 and f"--ref-python: ../nope/bin/python: no such file ({work}/../nope/bin/python)" in r.stderr
