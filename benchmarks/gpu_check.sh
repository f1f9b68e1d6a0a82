#!/usr/bin/env bash
# MLX's CUDA backend on an NVIDIA machine, checked in one go (meant to finish in 6-8 minutes on one H100):
#
#   benchmarks/gpu_check.sh [OUT_DIR]        # from the repository's root; results in OUT_DIR (default gpu-check/)
#
# Time limits (s): tests 210, benchmarks 100 (q4, q8) and 130 (bf16), so that the whole stays under 10 minutes.
# 1. MLX on CUDA, the documented way: a venv ($GPU_CHECK_VENV, default /tmp/moshi-gpu-venv) and
#    `MOSHI_MLX_BACKEND=cuda12|cuda13 pip install -e ".[dev]"` (the major version from nvidia-smi; hatch_build.py
#    keeps mlx-cpu out). Offline, GPU_CHECK_WHEELS names a folder of wheels for this machine's python3, installed
#    beside its own packages (pip --target, no index). The mlx-cuda wheel (~90 MB) may come as NAME-nolib.whl
#    plus its library as libmlx.so.xz (xz -9e: 67 MiB for mlx-cuda-13 0.32.4), or that file split into
#    libmlx.so.xz.part1, .part2, ... for hosts that carry less per transfer; put back together here.
#    Skipped when GPU_CHECK_PYTHON names an interpreter that already runs MLX on CUDA.
# 2. Tests with the GPU as MLX's default device (checked first): models, generation, sampling, engine, KV cache,
#    memory budget, checkpoints, reference parity. Log: OUT_DIR/tests.log.
# 3. The benchmark on random 7B weights in the published layout, q4, q8 and bf16, timed with the 3000-step window
#    full (--config 7b): OUT_DIR/bench-q4.json, ... (schema moshi_mlx.benchmark/2).
# 4. OUT_DIR/gpu-check.json (everything above in one file) and one verdict line, the script's last line.
#
# Exit status: 0 when the tests pass and every benchmark ran; 1 otherwise (the verdict says what failed).
# A dry run of the script itself on a machine without a GPU: GPU_CHECK_PYTHON=python GPU_CHECK_DRY=1
# (no CUDA required, --config tiny instead of 7b).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOSHI_MLX_DEMO_DIR=${MOSHI_MLX_DEMO_DIR:-/tmp/moshi-gpu-demo} HF_HUB_OFFLINE=1
START=$(date +%s)
step() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

# -- 1. MLX on CUDA ------------------------------------------------------------------------------------------------
on_cuda='import mlx.core as mx, sys; sys.exit(0 if mx.cuda.is_available() and mx.default_device() == mx.gpu else 1)'
PY=${GPU_CHECK_PYTHON:-}
CONFIG=7b
if [ -n "${GPU_CHECK_DRY:-}" ]; then
  on_cuda='import mlx.core'
  CONFIG=tiny
fi
if [ -n "$PY" ] && "$PY" -c "$on_cuda" 2>/dev/null; then
  step "MLX already runs on CUDA in $PY"
elif [ -n "${GPU_CHECK_WHEELS:-}" ]; then  # offline: the wheels as they are, beside the system's own packages
  PY=python3
  SITE=/tmp/moshi-gpu-site
  step "installing the wheels of $GPU_CHECK_WHEELS into $SITE"
  wheels=$("$PY" - "$GPU_CHECK_WHEELS" <<'EOF'
import lzma, pathlib, shutil, sys, zipfile
folder = pathlib.Path(sys.argv[1])
for w in sorted(folder.glob("*.whl")):
    if not w.name.endswith("-nolib.whl"):
        print(w)
for thin in folder.glob("*-nolib.whl"):  # the mlx-cuda wheel without its library, which came as libmlx.so.xz
    parts = sorted(folder.glob("libmlx.so.xz.part*")) or [folder / "libmlx.so.xz"]  # split: 67 MiB compressed
    full = pathlib.Path("/tmp") / thin.name.replace("-nolib.whl", ".whl")
    shutil.copy(thin, full)
    with zipfile.ZipFile(full, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mlx/lib/libmlx.so", lzma.decompress(b"".join(p.read_bytes() for p in parts)))
    print(full)
EOF
  ) || exit 1
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" $wheels > "$OUT/install.log" 2>&1
  export PYTHONPATH=$SITE:$PWD
  "$PY" -c "$on_cuda" || { echo "gpu_check: MLX does not run on CUDA here (see $OUT/install.log)"; exit 1; }
else  # online: the documented NVIDIA install, in a fresh venv
  VENV=${GPU_CHECK_VENV:-/tmp/moshi-gpu-venv}
  major=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)
  backend=cuda${major:-12}
  [ "$backend" = cuda12 ] || [ "$backend" = cuda13 ] || backend=cuda12
  step "MOSHI_MLX_BACKEND=$backend pip install -e .[dev] into $VENV"
  python3 -m venv "$VENV" || exit 1
  PY=$VENV/bin/python
  MOSHI_MLX_BACKEND=$backend "$PY" -m pip install -q --disable-pip-version-check -e ".[dev]" > "$OUT/install.log" 2>&1
  "$PY" -m pip list 2>/dev/null | grep -i "^mlx" >> "$OUT/install.log"
  "$PY" -c "$on_cuda" || { echo "gpu_check: MLX does not run on CUDA here (see $OUT/install.log)"; exit 1; }
fi
"$PY" -c 'import mlx.core as mx; print("MLX", mx.__version__, "default device", mx.default_device(), mx.device_info())' \
  | tee "$OUT/mlx.txt"

# -- 2. tests on the GPU -------------------------------------------------------------------------------------------
step "tests (GPU as MLX's default device)"
timeout 210 "$PY" -m pytest -q -p no:cacheprovider -o addopts= --timeout 180 \
  tests/unit/models tests/unit/test_generate.py tests/unit/test_sampling.py tests/unit/test_engine.py \
  tests/unit/model_files/test_budget.py tests/unit/model_files/test_checkpoint.py tests/test_reference_parity.py \
  --junitxml "$OUT/tests.xml" > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"

# -- 3. the benchmark, 7B random weights ---------------------------------------------------------------------------
for q in q4 q8 bf16; do
  # bf16's 15 GB of random weights take longest to write and load
  case $q in q4) flags=(-q 4) limit=100;; q8) flags=(-q 8) limit=100;; bf16) flags=(--dtype bfloat16) limit=130;; esac
  step "benchmark $CONFIG $q (random weights, full window)"
  timeout $limit "$PY" -m moshi_mlx.benchmark --config $CONFIG "${flags[@]}" --steps 60 --warmup 10 --realtime-frames 25 \
    --no-progress --json "$OUT/bench-$q.json" > "$OUT/bench-$q.log" 2>&1
  echo "exit $?" >> "$OUT/bench-$q.log"
  tail -2 "$OUT/bench-$q.log"
done

# -- 4. one file, one line -----------------------------------------------------------------------------------------
step "summary"
"$PY" - "$OUT" "$tests_rc" "$(( $(date +%s) - START ))" "$CONFIG" <<'EOF'
import json, pathlib, re, sys
import mlx.core as mx
out, tests_rc, seconds, config = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].upper()
log = (out / "tests.log").read_text(errors="replace")
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", log.splitlines()[-1] if log else "")}
bench, parts = {}, []
for q in ("q4", "q8", "bf16"):
    path = out / f"bench-{q}.json"
    if not path.is_file():
        tail = (out / f"bench-{q}.log").read_text(errors="replace").strip().splitlines()[-3:]
        bench[q] = {"error": " | ".join(tail)}
        parts.append(f"{config} {q} FAILED")
        continue
    r = json.loads(path.read_text())
    v, lm = r["verdict"], r.get("lm") or {}
    step = (lm.get("step") or {}).get("median_ms")
    bench[q] = {"verdict": v["line"], "keeps_up": v["keeps_up"], "ms_per_frame": v["ms_per_frame"], "basis": v["basis"],
                "lm_step_median_ms": step, "mlx_peak_gb": r["memory"]["mlx_peak_gb"], "load_s": r["load"]}
    parts.append(f"{config} {q} {'keeps up' if v['keeps_up'] else 'falls behind'} ({v['ms_per_frame']:.1f} ms/frame, "
                 f"LM step {step:.1f} ms)" if step is not None else f"{config} {q}: {v['line']}")
errors = counts.get("error", 0) + counts.get("errors", 0)
ok = tests_rc == 0 and all("error" not in b for b in bench.values())
device = mx.device_info().get("device_name", str(mx.default_device()))
verdict = (f"GPU check {'PASSED' if ok else 'FAILED'} on {device} (MLX {mx.__version__}, {seconds} s): tests "
           f"{counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, {errors} errors"
           f"{' (stopped at 210 s)' if tests_rc == 124 else ''}; "
           + "; ".join(parts))
summary = {"verdict": verdict, "ok": ok, "seconds": seconds, "mlx": mx.__version__, "device": str(mx.default_device()),
           "device_info": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in mx.device_info().items()},
           "tests": {"exit": tests_rc, **counts, "failures": re.findall(r"^FAILED (\S+)", log, re.M)[:30]},
           "bench": bench}
(out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(verdict)
sys.exit(0 if ok else 1)
EOF
