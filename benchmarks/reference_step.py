#!/usr/bin/env python3
"""Time one streaming LM step of the *reference* implementation (Kyutai's
``moshi-mlx`` 0.3.0 from PyPI) with random weights.

This script must be run by the python of a separate reference venv, never by
ours, because the reference package is also called ``moshi_mlx``::

    python3 -m venv ../refvenv
    ../refvenv/bin/pip install moshi-mlx==0.3.0
    ../refvenv/bin/pip install "mlx[cpu]==$(../refvenv/bin/pip show mlx | sed -n 's/^Version: //p')"  # Linux only
    cd /tmp && ../refvenv/bin/python /path/to/benchmarks/reference_step.py --config tiny --dtype f32

It builds the reference ``Lm`` for a named config (``tiny``, ``small``, ``7b``),
casts/quantizes it exactly as the reference's ``local.py`` does
(``set_dtype(bfloat16)`` then ``nn.quantize(model, bits, group_size)``),
materializes the random weights one tensor at a time (so a 7B model never has
its float32 init graph alive all at once), then drives the reference's
``LmGen`` with random user audio codes the way the reference's ``local.py``
server loop does, per step::

    text_token = gen.step(other_audio_tokens)     # (1, 8) int32
    text_token[0].item()
    audio_tokens = gen.last_audio_tokens()          # None for the first steps
    np.array(audio_tokens)                          # if not None

with the samplers the reference app uses (``utils.Sampler()``: temp 0.8,
top_p 0.95, for both text and audio). Only the ``--steps`` steps after
``--warmup`` untimed steps are timed. One JSON line is printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import typing

# --------------------------------------------------------------------------
# Guard against importing *our* moshi_mlx (same package name) instead of the
# reference one: drop every sys.path entry that points into our repository.
# --------------------------------------------------------------------------
_HERE = os.path.dirname(os.path.abspath(__file__))
_OUR_REPO = os.path.dirname(_HERE)


def _inside(path: str, root: str) -> bool:
    try:
        path = os.path.realpath(path or os.getcwd())
        root = os.path.realpath(root)
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def _shadows_reference(p: str) -> bool:
    """True for a sys.path entry that would import our moshi_mlx (repo root, '' or cwd in the repo)."""
    real = os.path.realpath(p or os.getcwd())
    if real == os.path.realpath(_OUR_REPO):
        return True
    return _inside(real, _OUR_REPO) and "-packages" not in real and os.path.isdir(os.path.join(real, "moshi_mlx"))


sys.path[:] = [p for p in sys.path if not _shadows_reference(p)]

CONFIGS = ("tiny", "small", "7b")
DTYPES = ("f32", "bf16", "q8", "q4")
# bits, group_size: as the reference's local.py / local_web.py / run_inference.py
QUANT = {"q8": (8, 64), "q4": (4, 32)}
# steps, warmup per config when not given on the command line
DEFAULT_STEPS = {"tiny": (100, 10), "small": (20, 3), "7b": (5, 1)}


def _fail(msg: str) -> "typing.NoReturn":
    print(f"reference_step.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def import_reference():
    try:
        import mlx.core as mx  # noqa: F401
    except Exception as e:  # e.g. libmlx.so missing: mlx without the [cpu] extra
        _fail(
            f"cannot import mlx in {sys.executable} ({e}).\n"
            "On Linux the CPU build needs the 'cpu' extra of the pinned version:\n"
            f"  {sys.executable} -m pip install \"mlx[cpu]==<version of mlx the venv has>\""
        )
    try:
        import moshi_mlx
        from moshi_mlx import models, utils
    except Exception as e:
        _fail(
            f"cannot import the reference moshi_mlx in {sys.executable} ({e}).\n"
            "Run this script with the reference venv's python (not ours); set that venv up with:\n"
            "  python3 -m venv ../refvenv && ../refvenv/bin/pip install moshi-mlx==0.3.0"
        )
    where = os.path.abspath(moshi_mlx.__file__ or "")
    if _inside(where, _OUR_REPO) or not hasattr(models, "config_v0_1"):
        _fail(
            f"imported moshi_mlx from {where}, which is OUR package, not the reference.\n"
            "Run this script with the reference venv's python, from a directory outside our\n"
            "repository, without our repo on PYTHONPATH, e.g.\n"
            f"  cd /tmp && ../refvenv/bin/python {os.path.abspath(__file__)} --config tiny"
        )
    try:
        from importlib.metadata import version

        ref_version = version("moshi_mlx")
    except Exception:
        ref_version = "unknown"
    return moshi_mlx, models, utils, ref_version


def make_config(models, name: str, overrides: dict):
    """config_v0_1 with only the sizes of the named preset changed."""
    cfg = models.config_v0_1()
    t, d = cfg.transformer, cfg.depformer.transformer
    # Same sizes as our presets (moshi_mlx.models.config.config_tiny / config_small);
    # compare_reference.py also passes our preset's sizes explicitly as overrides.
    if name == "tiny":
        sizes = dict(d_model=256, num_layers=4, num_heads=4, dep_d_model=256, dep_num_layers=2, dep_num_heads=4)
    elif name == "small":
        sizes = dict(d_model=1024, num_layers=8, num_heads=16, dep_d_model=512, dep_num_layers=4, dep_num_heads=8)
    elif name == "7b":
        sizes = {}
    else:
        raise ValueError(name)
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    if "d_model" in sizes:
        t.d_model = sizes["d_model"]
        t.dim_feedforward = 4 * t.d_model  # as v0_1 (gating hidden = 11 * d_model / 4)
    t.num_layers = sizes.get("num_layers", t.num_layers)
    t.num_heads = sizes.get("num_heads", t.num_heads)
    if "dep_d_model" in sizes:
        d.d_model = sizes["dep_d_model"]
        d.dim_feedforward = 4 * d.d_model
    d.num_layers = sizes.get("dep_num_layers", d.num_layers)
    d.num_heads = sizes.get("dep_num_heads", d.num_heads)
    return cfg


def config_summary(cfg) -> dict:
    t, d = cfg.transformer, cfg.depformer.transformer
    return dict(
        d_model=t.d_model, num_layers=t.num_layers, num_heads=t.num_heads,
        dim_feedforward=t.dim_feedforward, context=t.context,
        dep_d_model=d.d_model, dep_num_layers=d.num_layers, dep_num_heads=d.num_heads,
        dep_dim_feedforward=d.dim_feedforward, dep_context=d.context,
        audio_codebooks=cfg.audio_codebooks, generated_codebooks=cfg.generated_codebooks,
        text_in_vocab_size=cfg.text_in_vocab_size, text_out_vocab_size=cfg.text_out_vocab_size,
        audio_vocab_size=cfg.audio_vocab_size, audio_delays=list(cfg.audio_delays),
    )


def build_model(models, cfg, dtype: str, seed: int):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    mx.random.seed(seed)
    model = models.Lm(cfg)  # random init is lazy: nothing is allocated yet
    # logical parameter count (before quantization packs the weights)
    n_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    if dtype != "f32":
        model.set_dtype(mx.bfloat16)  # as the reference app, before quantizing
    if dtype in QUANT:
        bits, group_size = QUANT[dtype]
        nn.quantize(model, bits=bits, group_size=group_size)
    # Materialize one parameter at a time: each f32 init -> bf16 cast (-> quantize)
    # chain is evaluated and its temporaries freed before the next one starts,
    # so the peak stays near the final model size (+ the largest f32 temporary).
    n_bytes = 0
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
        n_bytes += p.nbytes
    return model, n_params, n_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=CONFIGS, default="tiny")
    ap.add_argument("--dtype", choices=DTYPES, default="f32")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default per config)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default per config)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-config", action="store_true", help="print the config sizes as JSON and exit")
    for flag in ("d-model", "num-layers", "num-heads", "dep-d-model", "dep-num-layers", "dep-num-heads"):
        ap.add_argument(f"--{flag}", type=int, default=None, help="override a size of the named config")
    args = ap.parse_args(argv)

    moshi_mlx, models, utils, ref_version = import_reference()
    import mlx.core as mx
    import numpy as np

    overrides = {k: getattr(args, k) for k in
                 ("d_model", "num_layers", "num_heads", "dep_d_model", "dep_num_layers", "dep_num_heads")}
    cfg = make_config(models, args.config, overrides)
    if args.print_config:
        print(json.dumps(dict(config=args.config, **config_summary(cfg))))
        return 0
    steps, warmup = DEFAULT_STEPS[args.config]
    steps = args.steps if args.steps is not None else steps
    warmup = args.warmup if args.warmup is not None else warmup
    if steps < 1 or warmup < 0:
        _fail("--steps must be >= 1 and --warmup >= 0")

    t0 = time.perf_counter()
    model, n_params, n_bytes = build_model(models, cfg, args.dtype, args.seed)
    build_s = time.perf_counter() - t0

    # Same samplers and call sequence as the reference's local.py server loop.
    gen = models.LmGen(
        model=model,
        max_steps=warmup + steps + 5,
        text_sampler=utils.Sampler(),
        audio_sampler=utils.Sampler(),
        check=False,
    )
    other = cfg.other_codebooks
    rng = np.random.default_rng(args.seed)
    # Random user audio codes (as Mimi would give them: values in [0, 2048)).
    user_codes = rng.integers(0, cfg.audio_vocab_size - 1, size=(warmup + steps, other, 1)).astype(np.uint32)

    mx.reset_peak_memory()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        data = mx.array(user_codes[i]).transpose(1, 0)[:, :other]
        text_token = gen.step(data)
        text_token = text_token[0].item()
        audio_tokens = gen.last_audio_tokens()
        if audio_tokens is not None:
            audio_tokens = np.array(audio_tokens).astype(np.uint32)
        dt = time.perf_counter() - t
        if i >= warmup:
            times.append(dt * 1000.0)

    times_sorted = sorted(times)
    p90 = times_sorted[min(len(times_sorted) - 1, int(round(0.9 * (len(times_sorted) - 1))))]
    median = statistics.median(times)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux
    result = {
        "impl": "reference",
        "config": args.config,
        "dtype": args.dtype,
        "median_ms": round(median, 3),
        "p90_ms": round(p90, 3),
        "max_ms": round(max(times), 3),
        "mean_ms": round(statistics.fmean(times), 3),
        "steps_per_s": round(1000.0 / median, 3),
        # MLX allocator peak during the step loop (weights + KV cache + activations)
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
        # whole-process peak RSS, including the model build
        "rss_peak_gb": round(rss_gb, 3),
        "steps": steps,
        "warmup": warmup,
        "build_s": round(build_s, 2),
        "params": n_params,
        "weights_gb": round(n_bytes / 1e9, 3),
        "mlx_version": mx.__version__,
        "moshi_mlx_version": ref_version,
        "device": str(mx.default_device()),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
