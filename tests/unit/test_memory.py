"""Memory measurements: the benchmark functions per --kv-bits, and the long Mimi run through the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

from moshi_mlx.audio.codec_choice import rustymimi_problem

ROOT = Path(__file__).resolve().parents[2]


def test_memory_per_kv_bits_through_the_benchmark(tmp_path):
    """One benchmark process per setting: the quantized caches are smaller and the LM's peak holds weights + KV."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--config", "tiny", "--dtype", "float32",
         "--kv-bits", "4", "16", "--steps", "1", "--max-memory", "3"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    runs = {r["kv_bits"]: r for r in json.loads(proc.stdout)["runs"]}
    assert runs[4]["kv_cache_gb"] < runs[16]["kv_cache_gb"]
    for r in runs.values():
        assert r["lm_alone"]["mlx_peak_gb"] >= r["weights_gb"] + r["kv_cache_gb"] * 0.99
        assert r["process_rss_peak_gb"] >= r["lm_alone"]["rss_peak_gb"] > 0 and r["step_ms_median"] > 0
        # --max-memory reaches the app's memory plan, and its start-up line is recorded with the window it chose
        assert r["max_memory_gb"] == 3 and r["memory_line"].startswith("memory: budget 3.00 GB") and r["context"] > 0
        # Mimi's instances load beside the LM (one MLX copy where rustymimi is missing); the LM's share leaves them out.
        assert r["mimi_gb"] > (0.75 if rustymimi_problem() is None else 0.25) and r["lm_rss_over_weights"] == round(
            (r["lm_alone"]["rss_peak_gb"] - r["mimi_gb"]) / r["weights_gb"], 3)


def test_long_mimi_run_cli(demo_files):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOSHI_MLX_DEMO_DIR": str(demo_files.mimi_path.parent)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--long", "--minutes", "0.02", "0.04"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    long = json.loads(proc.stdout)["mimi_long"]
    assert set(long) == {"rss_mb_at_min_0.02", "rss_max_mb_min_0.02", "rss_mb_at_min_0.04", "rss_max_mb_min_0.04"}
    assert long["rss_max_mb_min_0.04"] >= long["rss_mb_at_min_0.04"] > 300  # three Mimi instances are resident
    assert "minute 0.04" in proc.stderr


def test_a_finished_generator_frees_its_cache_at_once():
    """No reference cycle through the compiled depformer: the KV cache goes when the LmGen does."""
    import gc
    import weakref

    from moshi_mlx.generate import LmGen
    from moshi_mlx.model_files.stand_ins import demo_lm

    lm = demo_lm()
    gen = LmGen(lm, seed=0, kv_bits=8)
    gen.step([0] * lm.config.user_codebooks)
    cache = weakref.ref(gen._cache)
    gc.disable()
    try:
        del gen
        assert cache() is None
    finally:
        gc.enable()
