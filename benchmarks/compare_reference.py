#!/usr/bin/env python3
"""Side-by-side step timing: the reference (Kyutai's ``moshi-mlx`` 0.3.0 from
PyPI, in its own venv) versus our implementation, on the same config/dtype rows.

Each row runs each side in its own subprocess (so peak memory is per
row and per side), one after the other -- never two at once:

* reference: ``benchmarks/reference_step.py`` run by ``--ref-python`` (default
  $MOSHI_MLX_REF_PYTHON, else ``refvenv/bin/python`` beside the checkout), with cwd outside our repo and without our repo
  on ``PYTHONPATH`` (the reference package is also called ``moshi_mlx``);
* ours: ``moshi_mlx.benchmark.time_lm_steps(config_name, dtype, steps, warmup, seed)``
  run by this python with our repo on ``PYTHONPATH``.

Both sides use random weights, random user audio codes, the same number of
untimed warmup steps and timed steps. Output: a readable table, and with
``--json PATH`` the full rows.

    python benchmarks/compare_reference.py                       # tiny f32, small bf16, small q4
    python benchmarks/compare_reference.py --include-7b          # + 7b bf16, 7b q4 (needs ~16 GB RAM)
    python benchmarks/compare_reference.py --rows tiny:f32 --side reference
    python benchmarks/compare_reference.py --repeat 3 --json /tmp/cmp.json   # on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REF_SCRIPT = os.path.join(HERE, "reference_step.py")
# The reference venv: --ref-python, else $MOSHI_MLX_REF_PYTHON, else ../refvenv beside the checkout.
DEFAULT_REF_PYTHON = os.environ.get(
    "MOSHI_MLX_REF_PYTHON", os.path.join(os.path.dirname(REPO), "refvenv", "bin", "python")
)
DEFAULT_ROWS = ["tiny:f32", "small:bf16", "small:q4"]
ROWS_7B = ["7b:bf16", "7b:q4"]
# (steps, warmup) per config; same defaults as reference_step.py
DEFAULT_STEPS = {"tiny": (100, 10), "small": (20, 3), "7b": (5, 1)}
CONFIGS = ("tiny", "small", "7b")
DTYPES = ("f32", "bf16", "q8", "q4")

SETUP_HELP = """\
The reference venv is missing ({path}). Set it up (outside our .venv) with:

    python3 -m venv ../refvenv
    ../refvenv/bin/pip install moshi-mlx==0.3.0
    # Linux: the mlx wheel has no CPU backend without its 'cpu' extra; install the pinned version's extra
    ../refvenv/bin/pip install "mlx[cpu]==$(../refvenv/bin/pip show mlx | sed -n 's/^Version: //p')"
    cd /tmp && ../refvenv/bin/python -c "import mlx.core as mx, moshi_mlx; print(mx.__version__, moshi_mlx.__file__)"

or pass --ref-python PATH, or --side ours to skip the reference."""


def _last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _run(cmd: list[str], cwd: str, env: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    res = _last_json_line(proc.stdout)
    if res is not None and "error" in res:
        return res
    if proc.returncode != 0 or res is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}: " + "\n".join(tail)}
    return res


OVERRIDABLE = ("d_model", "num_layers", "num_heads", "dep_d_model", "dep_num_layers", "dep_num_heads")


def run_reference(ref_python: str, config: str, dtype: str, steps: int, warmup: int, seed: int,
                  timeout: float, sizes: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    cmd = [ref_python, REF_SCRIPT, "--config", config, "--dtype", dtype,
           "--steps", str(steps), "--warmup", str(warmup), "--seed", str(seed)]
    for key in OVERRIDABLE:  # build the reference with exactly our preset's sizes
        if sizes and key in sizes:
            cmd += [f"--{key.replace('_', '-')}", str(sizes[key])]
    return _run(cmd, cwd=tempfile.gettempdir(), env=env, timeout=timeout)


def reference_config(ref_python: str, config: str, sizes: dict | None = None) -> dict | None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    cmd = [ref_python, REF_SCRIPT, "--config", config, "--print-config"]
    for key in OVERRIDABLE:
        if sizes and key in sizes:
            cmd += [f"--{key.replace('_', '-')}", str(sizes[key])]
    res = _run(cmd, cwd=tempfile.gettempdir(), env=env, timeout=120)
    return None if "error" in res else res


def ours_config(config: str) -> dict | None:
    """Our preset's sizes (None when our moshi_mlx.models.config is not importable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    res = _run([sys.executable, os.path.abspath(__file__), "--ours-config-worker", config],
               cwd=REPO, env=env, timeout=120)
    return None if "error" in res else res


def run_ours(config: str, dtype: str, steps: int, warmup: int, seed: int, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, os.path.abspath(__file__), "--ours-worker",
           config, dtype, str(steps), str(warmup), str(seed)]
    return _run(cmd, cwd=REPO, env=env, timeout=timeout)


# ---------------------------------------------------------------- our worker
def _our_config_sizes(config: str) -> dict | None:
    """Best effort: the main sizes of our preset, named as reference_step.py --print-config names them."""
    try:
        from moshi_mlx.models.config import preset

        cfg = preset(config)
    except Exception:
        return None

    def get(obj, *names):
        for name in names:
            cur = obj
            for part in name.split("."):
                cur = getattr(cur, part, None)
                if cur is None:
                    break
            if cur is not None:
                return cur
        return None

    dep = get(cfg, "depformer.transformer", "depformer")
    sizes = {
        "d_model": get(cfg, "transformer.d_model", "d_model", "dim"),
        "num_layers": get(cfg, "transformer.num_layers", "num_layers"),
        "num_heads": get(cfg, "transformer.num_heads", "num_heads"),
        "dep_d_model": get(dep, "d_model", "dim") if dep is not None else None,
        "dep_num_layers": get(dep, "num_layers") if dep is not None else None,
        "dep_num_heads": get(dep, "num_heads") if dep is not None else None,
        "dim_feedforward": get(cfg, "transformer.dim_feedforward"),
        "dep_dim_feedforward": get(dep, "dim_feedforward") if dep is not None else None,
        "context": get(cfg, "transformer.context", "context"),
        "dep_context": get(dep, "context") if dep is not None else None,
        "audio_codebooks": get(cfg, "audio_codebooks", "n_q"),
        "text_out_vocab_size": get(cfg, "text_out_vocab_size"),
    }
    return {k: v for k, v in sizes.items() if isinstance(v, int)}


def ours_worker(config: str, dtype: str, steps: int, warmup: int, seed: int) -> int:
    import resource

    try:
        from moshi_mlx.benchmark import time_lm_steps
    except ImportError as e:
        print(json.dumps({"error": f"our moshi_mlx.benchmark.time_lm_steps is not available yet ({e})"}))
        return 3
    res = dict(time_lm_steps(config, dtype, steps, warmup, seed))
    res.setdefault("impl", "ours")
    res.setdefault("config", config)
    res.setdefault("dtype", dtype)
    res.setdefault("steps", steps)
    res.setdefault("warmup", warmup)
    try:
        import mlx.core as mx

        res.setdefault("mlx_version", mx.__version__)
    except Exception:
        pass
    res.setdefault("rss_peak_gb", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3))
    print(json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------- report
def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(rows: list[dict]) -> None:
    header = ["config", "dtype", "steps", "ref ms/step", "ours ms/step", "speedup", "ref p90", "ours p90",
              "ref peak GB", "ours peak GB"]
    lines = [header]
    for r in rows:
        ref, ours = r.get("reference") or {}, r.get("ours") or {}
        lines.append([
            r["config"], r["dtype"], f"{r['steps']}+{r['warmup']}w",
            _fmt(ref.get("median_ms")) if "error" not in ref else "ERR",
            _fmt(ours.get("median_ms")) if "error" not in ours else "ERR",
            (f"{r['speedup']:.2f}x" if r.get("speedup") else "-"),
            _fmt(ref.get("p90_ms")), _fmt(ours.get("p90_ms")),
            _fmt(ref.get("peak_memory_gb"), 2), _fmt(ours.get("peak_memory_gb"), 2),
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for j, line in enumerate(lines):
        print("  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print("speedup = reference median / our median (>1: we are faster)")
    for r in rows:
        for side in ("reference", "ours"):
            err = (r.get(side) or {}).get("error")
            if err:
                print(f"[{r['config']} {r['dtype']}] {side}: {err}")
        if r.get("config_mismatch"):
            print(f"[{r['config']}] WARNING: config sizes differ (ours vs reference): {r['config_mismatch']}")


def parse_rows(specs: list[str]) -> list[tuple[str, str]]:
    rows = []
    for spec in specs:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            config, _, dtype = item.partition(":")
            config = config.lower()
            if config not in CONFIGS or dtype not in DTYPES:
                raise SystemExit(f"bad row {item!r}: want CONFIG:DTYPE with CONFIG in {CONFIGS}, DTYPE in {DTYPES}")
            rows.append((config, dtype))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ours-config-worker"]:
        sizes = _our_config_sizes(argv[1])
        print(json.dumps(sizes if sizes else {"error": "our preset() is not available"}))
        return 0 if sizes else 3
    if argv[:1] == ["--ours-worker"]:
        config, dtype, steps, warmup, seed = argv[1:6]
        return ours_worker(config, dtype, int(steps), int(warmup), int(seed))

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--rows", nargs="*", default=None,
                    help=f"CONFIG:DTYPE rows, comma or space separated (default {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--include-7b", action="store_true", help=f"add {','.join(ROWS_7B)} (slow, ~16 GB RAM)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps for every row (default per config)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps for every row (default per config)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each side N times, alternating order; report each side's lowest median")
    ap.add_argument("--side", choices=("both", "reference", "ours"), default="both")
    ap.add_argument("--ref-python", default=DEFAULT_REF_PYTHON)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per side per row")
    ap.add_argument("--json", metavar="PATH", help="write all rows as JSON here")
    args = ap.parse_args(argv)

    rows = parse_rows(args.rows) if args.rows else list(parse_rows(DEFAULT_ROWS))
    if args.include_7b:
        rows += [r for r in parse_rows(ROWS_7B) if r not in rows]

    do_ref = args.side in ("both", "reference")
    do_ours = args.side in ("both", "ours")
    if do_ref and not os.path.exists(args.ref_python):
        print(SETUP_HELP.format(path=args.ref_python), file=sys.stderr)
        return 2

    ref_cfgs: dict[str, dict | None] = {}
    our_cfgs: dict[str, dict | None] = {}
    results = []
    for config, dtype in rows:
        steps, warmup = DEFAULT_STEPS[config]
        steps = args.steps if args.steps is not None else steps
        warmup = args.warmup if args.warmup is not None else warmup
        row: dict = {"config": config, "dtype": dtype, "steps": steps, "warmup": warmup}
        print(f"== {config} {dtype}: {warmup} warmup + {steps} timed steps", file=sys.stderr, flush=True)
        if config not in our_cfgs:
            our_cfgs[config] = ours_config(config)
        sizes = our_cfgs[config]
        if sizes:
            row["sizes"] = sizes
        runs: dict[str, list[dict]] = {"reference": [], "ours": []}
        sides = [s for s, on in (("reference", do_ref), ("ours", do_ours)) if on]
        for rep in range(args.repeat):
            # alternate the order (A B, B A, ...) so slow drift in machine load hits both sides alike
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                if side == "reference":
                    res = run_reference(args.ref_python, config, dtype, steps, warmup, args.seed,
                                        args.timeout, sizes)
                else:
                    res = run_ours(config, dtype, steps, warmup, args.seed, args.timeout)
                runs[side].append(res)
                print(f"   {side + ':':10s} {json.dumps(res)}", file=sys.stderr, flush=True)
        for side in sides:
            ok = [r for r in runs[side] if "error" not in r]
            # the least-disturbed run (lowest median) stands for the side; all runs go to the JSON
            row[side] = min(ok, key=lambda r: r["median_ms"]) if ok else runs[side][-1]
            if args.repeat > 1:
                row[side + "_runs"] = runs[side]
        ref, ours = row.get("reference") or {}, row.get("ours") or {}
        if ref.get("median_ms") and ours.get("median_ms"):
            row["ratio_ours_over_ref"] = round(ours["median_ms"] / ref["median_ms"], 4)
            row["speedup"] = round(ref["median_ms"] / ours["median_ms"], 4)
        if do_ref and sizes:
            if config not in ref_cfgs:
                ref_cfgs[config] = reference_config(args.ref_python, config, sizes)
            rc = ref_cfgs[config]
            if rc:
                diff = {k: {"ours": v, "reference": rc.get(k)} for k, v in sizes.items()
                        if k in rc and rc[k] != v}
                if diff:
                    row["config_mismatch"] = diff
        results.append(row)

    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": results}, f, indent=2)
        print(f"wrote {args.json}")
    failed = any("error" in (r.get(s) or {}) for r in results for s in ("reference", "ours"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
