"""The memory budget choice, with the published 7B layout's numbers computed (nothing allocated)."""

import json
import os

import pytest

from moshi_mlx.model_files.budget import (
    MIN_CONTEXT,
    BudgetError,
    machine_budget_bytes,
    plan_memory,
)
from moshi_mlx.models.cache import kv_cache_bytes

GiB = 2**30


@pytest.fixture(scope="module")
def q4_7b(manifests_dir):
    m = json.loads((manifests_dir / "moshi-7b-mlx-q4.json").read_text())
    t = m["config"].get("transformer", m["config"])
    return dict(
        weight_bytes=m["total_bytes"],
        num_layers=t.get("num_layers", 32),
        num_heads=t.get("num_heads", 32),
        head_dim=t.get("d_model", 4096) // t.get("num_heads", 32),
        context=t.get("context", 3000),
    )


def test_7b_q4_on_an_8gb_mac_gets_4bit_kv_full_window(q4_7b):
    plan = plan_memory(**q4_7b, budget_bytes=int(8 * GiB * 2 / 3))  # Metal's working set on 8 GB
    assert plan.kv_bits == 4 and plan.context == 3000
    assert plan.total_bytes <= plan.budget_bytes
    assert "4-bit KV" in plan.describe() and "full window" in plan.describe() and "\n" not in plan.describe()


def test_bigger_budgets_keep_8bit_and_smaller_ones_shorten_the_window(q4_7b):
    assert plan_memory(**q4_7b, budget_bytes=16 * GiB).kv_bits == 8
    tight = plan_memory(**q4_7b, budget_bytes=q4_7b["weight_bytes"] + 400 * 2**20)
    assert tight.kv_bits == 4 and MIN_CONTEXT <= tight.context < 3000
    assert tight.total_bytes <= tight.budget_bytes
    fixed = plan_memory(**q4_7b, budget_bytes=int(5.33 * GiB), kv_bits=8)
    assert fixed.kv_bits == 8 and fixed.context < 3000  # a chosen precision is kept, the window gives way
    with pytest.raises(BudgetError, match="budget"):
        plan_memory(**q4_7b, budget_bytes=4 * GiB)


def test_kv_sizes_of_the_7b_layout(q4_7b):
    full = {b: kv_cache_bytes(32, 32, 128, 3000, b) for b in (16, 8, 4)}
    assert full[16] == 2 * 32 * 32 * 3000 * 128 * 2  # 1.57 GB in bf16
    assert full[4] < full[8] < full[16] / 1.8


def test_machine_budget_is_positive_and_below_ram():
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < machine_budget_bytes() <= ram


def test_on_cuda_the_default_budget_is_the_gpus_own_memory(monkeypatch):
    """CUDA's device_info has no recommended working set, only the GPU's total memory (MLX >= 0.30.6): the budget
    must come from it, not from host RAM. No GPU here: MLX's answers on an 80 GB card are stood in."""
    import mlx.core as mx

    from moshi_mlx.model_files import budget

    monkeypatch.setattr(budget, "on_cuda", lambda: True)  # budget's own name for models.cache.on_cuda
    monkeypatch.setattr(mx, "device_info", lambda *a: {"device_name": "NVIDIA H100", "total_memory": 80 * 10**9,
                                                        "free_memory": 79 * 10**9}, raising=False)
    assert machine_budget_bytes() == int(80 * 10**9 * budget.CUDA_MEMORY_SHARE)
    monkeypatch.setattr(budget, "on_cuda", lambda: False)  # the same keys off CUDA: host RAM rules
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert machine_budget_bytes() == ram * 2 // 3


def test_load_from_args_plans_memory_and_the_engine_follows(demo_files, monkeypatch):
    """--max-memory through the shared flags: one start-up line, MLX limits set, the engine's cache sized."""
    import argparse

    import mlx.core as mx

    from moshi_mlx.cli.flags import add_engine_args, load_from_args, settings_from_args
    from moshi_mlx.model_files.budget import weights_bytes

    monkeypatch.setenv("MOSHI_MLX_DEMO_DIR", str(demo_files.mimi_path.parent))
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    lines = []
    from moshi_mlx.model_files.stand_ins import demo_lm

    weights = weights_bytes(demo_lm())
    kv8 = kv_cache_bytes(4, 4, 64, 3000, 8, dtype_bytes=4)
    budget_gb = (weights + 256 * 2**20 + kv8 // 2) / 1e9  # room for half the 8-bit window
    args = parser.parse_args(["--demo", "--max-memory", f"{budget_gb:.6f}"])
    orig_memory = mx.set_memory_limit(0)
    mx.set_memory_limit(orig_memory)
    orig_cache = mx.set_cache_limit(0)
    mx.set_cache_limit(orig_cache)
    assets = load_from_args(args, log=lines.append)
    try:
        memory_lines = [l for l in lines if l.startswith("memory:")]
        assert len(memory_lines) == 1 and "4-bit KV" in memory_lines[0], lines
        assert assets.memory.kv_bits == 4
        engine = assets.engine(settings_from_args(args))
        assert engine.gen._cache.kv_bits == 4 and engine.gen._cache.capacity == assets.memory.context
        # returns the limit it replaces: the budget, plus the MLX Mimi where that is the codec (no rustymimi)
        assert mx.set_memory_limit(orig_memory) == assets.memory.mlx_limit_bytes
        cache_kept = mx.set_cache_limit(orig_cache)
        # MLX's CPU allocator had no cache before 0.30 (set_cache_limit is a no-op answering 0 on mlx-cpu 0.29.3)
        assert cache_kept in ((assets.memory.reserve_bytes,) if orig_cache else (0, assets.memory.reserve_bytes))
    finally:
        mx.set_memory_limit(orig_memory)
        mx.set_cache_limit(orig_cache)
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-memory", "-1"])


def test_the_mlx_mimi_is_counted_beside_the_lm():
    """The MLX Mimi lives in MLX's allocator: the LM keeps its budget, MLX's limit grows by the codec, the line says so."""
    shape = {"weight_bytes": 2 * 10**9, "num_layers": 4, "num_heads": 8, "head_dim": 64, "context": 3000}
    budget = plan_memory(**shape, budget_bytes=10**10).total_bytes + 10**6  # the 8-bit full window, just
    without = plan_memory(**shape, budget_bytes=budget)
    with_mimi = plan_memory(**shape, budget_bytes=budget, codec_bytes=350 * 10**6)
    assert (with_mimi.kv_bits, with_mimi.context) == (without.kv_bits, without.context)
    assert with_mimi.mlx_limit_bytes == budget + 350 * 10**6 and without.mlx_limit_bytes == budget
    assert "MLX Mimi 0.35 GB beside it" in with_mimi.describe() and "Mimi" not in without.describe()
