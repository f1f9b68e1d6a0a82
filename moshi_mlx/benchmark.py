"""How fast is Moshi on this machine? LM step, depformer share, Mimi, full pipeline, load time, memory.

Run it on the model you will talk to::

    python -m moshi_mlx.benchmark -q 4                      # published 4-bit Moshiko (downloads once)
    python -m moshi_mlx.benchmark --moshi-weights model.q8.safetensors --json m2pro-q8.json
    python -m moshi_mlx.benchmark --config small --dtype q4 # random weights, nothing downloaded
    python -m moshi_mlx.benchmark --long                    # 10,000 steps of the tiny model: flat?

It prints a table and a one-line verdict ("keeps up with real time at -q 4 with 35 % headroom")
and, with ``--json PATH``, writes every figure plus the machine (OS, chip, MLX version and device)
so results from different Macs can be compared.

What is measured, in this order:

* load: ``load_lm`` on the weights file (or, for random weights, building and materialising them;
  ``--save-load`` also writes them to a temporary safetensors file and times ``load_lm`` on it);
* the LM step as the app runs it (``LmGen.step``: submit + wait for the tokens);
* the same step split in two, with a sync in between: the temporal transformer (+ text head and text
  sampling) and the depformer (all generated codebooks, incl. sampling); the depformer's share;
* Mimi encode and decode of one 80 ms frame;
* the whole pipeline, mic frame in -> speaker frame out: ``ConversationEngine.process`` one frame at
  a time, the threaded ``EngineRunner`` kept busy (throughput), and the runner fed at the real 80 ms
  pace (latency, dropped frames).

The timed steps start with the attention window already full (``--position full``, the default):
that is the steady state after about 4 minutes of conversation and the slowest case, so the verdict
does not flatter. ``--position 0`` times a fresh conversation instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import mlx.core as mx
import numpy as np

from .loading import GROUP_SIZE_FOR_BITS, Quantization, WeightsError, _materialise, build_model, load_lm, save_lm
from .models.config import PRESETS, LmConfig, config_v0_1, preset
from .models.lm import Lm

FRAME_MS = 80.0  # one Mimi frame: 1920 samples at 24 kHz
FRAME_SIZE = 1920
SCHEMA = "moshi_mlx.benchmark/1"
DEFAULT_STEPS = 200
DEFAULT_WARMUP = 20
DEFAULT_LONG_STEPS = 10_000
DEFAULT_REALTIME_FRAMES = 100  # 8 s of audio fed at the real pace

# --dtype spellings -> canonical name
DTYPE_NAMES = {
    "f32": "f32", "float32": "f32",
    "bf16": "bf16", "bfloat16": "bf16",
    "f16": "f16", "float16": "f16",
    "q8": "q8", "q4": "q4",
}
_FLOAT = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def summarize(times_ms: Iterable[float]) -> dict[str, float]:
    """median / p90 / max / mean / min of a list of milliseconds (nearest-rank p90, as reference_step.py)."""
    times = [float(t) for t in times_ms]
    if not times:
        return {"n": 0}
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {
        "n": len(times),
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(p90, 3),
        "max_ms": round(ordered[-1], 3),
        "mean_ms": round(statistics.fmean(times), 3),
        "min_ms": round(ordered[0], 3),
    }


def canonical_dtype(name: str) -> str:
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of: f32, bf16, f16, q8, q4") from None


def dtype_spec(name: str) -> tuple[mx.Dtype, Quantization | None]:
    """Compute dtype and quantization for a --dtype name.

    q8/q4: published group sizes, and the scales/norms in the dtype `load_lm` would pick for a
    quantized file on the current device (bf16 on Metal; float32 on the CPU, where MLX's
    quantized matmul is much faster that way), so random weights run as a loaded file would.
    """
    name = canonical_dtype(name)
    if name in _FLOAT:
        return _FLOAT[name], None
    bits = int(name[1:])
    quant = Quantization(bits, GROUP_SIZE_FOR_BITS[bits])
    try:
        from .loading import default_dtype
    except ImportError:  # older loading.py: bf16 everywhere
        return mx.bfloat16, quant
    return default_dtype(quant), quant


def rss_peak_bytes() -> int:
    """Process peak resident set (ru_maxrss: bytes on macOS, KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_now_bytes() -> int | None:
    """Current resident set, best effort (Linux /proc, macOS ps)."""
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _gb(n: int | float | None) -> float | None:
    return None if n is None else round(n / 1e9, 3)


def _mb(n: int | float | None) -> float | None:
    return None if n is None else round(n / 1e6, 2)


class _Progress:
    """A progress bar on stderr (tqdm, a dependency of huggingface_hub), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        try:
            from tqdm import tqdm  # noqa: F401

            self._tqdm = tqdm
        except ImportError:  # pragma: no cover
            self._tqdm = None

    def __call__(self, total: int, desc: str):
        if self.enabled and self._tqdm is not None:
            return self._tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="step", dynamic_ncols=True)
        return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_NO_PROGRESS = _Progress(False)


# ----------------------------------------------------------------------------------------------
# machine description
# ----------------------------------------------------------------------------------------------
def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def machine_info() -> dict[str, Any]:
    """Enough to tell two benchmark results apart: OS, chip, memory, Python, MLX version and device."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    chip = None
    memory = None
    if sys.platform == "darwin":
        mac_ver = platform.mac_ver()[0]
        info["os"] = f"macOS {mac_ver}" if mac_ver else "macOS"
        chip = _sysctl("machdep.cpu.brand_string")
        mem = _sysctl("hw.memsize")
        memory = int(mem) if mem and mem.isdigit() else None
        model = _sysctl("hw.model")
        if model:
            info["model"] = model
        perf, eff = _sysctl("hw.perflevel0.physicalcpu"), _sysctl("hw.perflevel1.physicalcpu")
        if perf:
            info["performance_cores"] = int(perf)
        if eff:
            info["efficiency_cores"] = int(eff)
    else:
        info["os"] = f"{platform.system()} {platform.release()}"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        chip = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        memory = int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            pass
    info["chip"] = chip or platform.processor() or platform.machine()
    info["memory_gb"] = _gb(memory)
    info["mlx_version"] = mx.__version__
    device = mx.default_device()
    info["mlx_device"] = "gpu" if device.type == mx.DeviceType.gpu else "cpu"
    try:
        info["mlx_device_info"] = _json_safe(mx.device_info())
    except Exception:  # older MLX: mx.metal.device_info on macOS only
        try:
            info["mlx_device_info"] = _json_safe(mx.metal.device_info())
        except Exception:
            pass
    try:
        from importlib.metadata import version

        info["moshi_mlx_version"] = version("moshi_mlx")
    except Exception:
        pass
    return info


def set_device(name: str | None) -> None:
    """--device cpu|gpu -> mx.set_default_device, with a clear message when there is no GPU backend."""
    if name is None:
        return
    if name == "gpu":
        available = getattr(mx, "is_available", None)
        if available is not None and not available(mx.gpu):
            raise ValueError("--device gpu: this MLX build has no GPU backend (install MLX with Metal or CUDA)")
        mx.set_default_device(mx.gpu)
    elif name == "cpu":
        mx.set_default_device(mx.cpu)
    else:
        raise ValueError(f"--device must be cpu or gpu, got {name!r}")


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def param_count(config: LmConfig) -> int:
    """Logical parameter count (before quantization packs weights); nothing is allocated."""
    from mlx.utils import tree_flatten

    return int(sum(p.size for _, p in tree_flatten(Lm(config).parameters())))


def weights_bytes(model: Lm) -> int:
    from mlx.utils import tree_flatten

    return int(sum(p.nbytes for _, p in tree_flatten(model.parameters())))


def random_lm(
    config: LmConfig | str, dtype: str = "f32", seed: int = 0, progress: Callable[[int, int], None] | None = None
) -> tuple[Lm, float]:
    """Random weights for a named or given config, built and materialised layer by layer.

    Returns (model, seconds). q8/q4 are cast to bf16 first and then quantized, as the published files.
    """
    cfg = preset(config) if isinstance(config, str) else config
    compute, quant = dtype_spec(dtype)
    mx.random.seed(seed)
    start = time.perf_counter()
    model = build_model(cfg, quant, compute)
    _materialise(model, progress)
    return model, time.perf_counter() - start


def random_user_codes(config: LmConfig, n: int, seed: int = 0) -> np.ndarray:
    """What Mimi would hand the LM for n frames of the user's voice: [n, user_codebooks] in [0, audio_card)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.audio_card, size=(n, config.user_codebooks)).astype(np.int32)


def _seek(gen, position: int) -> None:
    """Pretend the conversation is `position` steps old: the attention window reads that many slots.

    Only the cost matters here, so the (stale or zero) cache contents are fine. LmGen keeps its
    cache private; this is the one place we reach into it.
    """
    gen._cache.position = int(position)


def resolve_position(position: str | int, config: LmConfig) -> int:
    if isinstance(position, str):
        if position.lower() == "full":
            return config.transformer.context
        try:
            position = int(position)
        except ValueError:
            raise ValueError(f"--position must be 'full' or a number of steps, got {position!r}") from None
    if position < 0:
        raise ValueError("--position must be >= 0 or 'full'")
    return position


# ----------------------------------------------------------------------------------------------
# the measurements
# ----------------------------------------------------------------------------------------------
def time_fused_steps(
    model: Lm, steps: int, warmup: int, seed: int = 0, position: int = 0, progress: _Progress = _NO_PROGRESS
) -> list[float]:
    """LmGen.step as the app runs it (submit, then wait for the sampled tokens); returns ms per timed step."""
    from .generate import LmGen

    gc.collect()  # a previous run's cache must be gone before this one's peak is measured
    gen = LmGen(model, seed=seed)
    _seek(gen, position)
    codes = random_user_codes(model.config, warmup + steps, seed)
    times = []
    with progress(warmup + steps, "LM step") as bar:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            gen.step(codes[i])
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(dt)
            bar.update()
    return times


def time_split_steps(
    model: Lm, steps: int, warmup: int, seed: int = 0, position: int = 0, progress: _Progress = _NO_PROGRESS
) -> tuple[list[float], list[float]]:
    """The step in two timed halves with a sync between them.

    temporal: Lm.temporal (embeddings, temporal transformer, text head) + text sampling;
    depformer: Depformer.sample (every generated codebook, one after the other, incl. sampling).
    Same samplers and cache as LmGen; the codebook delays do not change the cost and are skipped.
    """
    from .sampling import DEFAULT_AUDIO_SAMPLING, DEFAULT_TEXT_SAMPLING, make_sampler

    cfg = model.config
    text_sampler = make_sampler(DEFAULT_TEXT_SAMPLING, cfg.text_out_vocab_size)
    audio_sampler = make_sampler(DEFAULT_AUDIO_SAMPLING, cfg.audio_card)
    cache = model.make_cache(1)
    cache.position = position
    key = mx.random.key(seed)
    codes = random_user_codes(cfg, warmup + steps, seed + 1)
    previous = mx.zeros((1, 1 + cfg.generated_codebooks), dtype=mx.int32)
    temporal_ms, depformer_ms = [], []
    with progress(warmup + steps, "split step") as bar:
        for i in range(warmup + steps):
            keys = mx.random.split(key, 2 + cfg.generated_codebooks)
            key = keys[0]
            tokens = mx.concatenate([previous, mx.array(codes[i])[None, :]], axis=1)
            t0 = time.perf_counter()
            hidden, text_logits = model.temporal(tokens, cache.layers, cache.context())
            text = text_sampler(text_logits, keys[1])
            mx.eval(hidden, text, key)
            t1 = time.perf_counter()
            audio = model.depformer.sample(hidden, text, audio_sampler, keys[2:])
            mx.eval(audio)
            t2 = time.perf_counter()
            cache.position += 1
            previous = mx.concatenate([text[:, None], audio], axis=1)
            if i >= warmup:
                temporal_ms.append((t1 - t0) * 1e3)
                depformer_ms.append((t2 - t1) * 1e3)
            bar.update()
    return temporal_ms, depformer_ms


def speechlike_pcm(n_frames: int, seed: int = 0) -> np.ndarray:
    """[n_frames, 1920] float32: quiet noise with a wobbling tone (Mimi's cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * FRAME_SIZE) / 24_000.0
    tone = 0.2 * np.sin(2 * np.pi * (180 + 40 * np.sin(2 * np.pi * 3 * t)) * t)
    pcm = tone + 0.02 * rng.standard_normal(t.shape)
    return pcm.astype(np.float32).reshape(n_frames, FRAME_SIZE)


def time_mimi(mimi, frames: int, warmup: int, seed: int = 0, progress: _Progress = _NO_PROGRESS):
    """Mimi encode_frame and decode_frame, ms per 80 ms frame each (from a fresh stream)."""
    pcm = speechlike_pcm(warmup + frames, seed)
    codes = np.random.default_rng(seed).integers(0, 2048, size=(warmup + frames, mimi.num_codebooks))
    mimi.reset()
    enc, dec = [], []
    with progress(2 * (warmup + frames), "Mimi") as bar:
        for i in range(warmup + frames):
            t0 = time.perf_counter()
            mimi.encode_frame(pcm[i])
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                enc.append(dt)
            bar.update()
        for i in range(warmup + frames):
            t0 = time.perf_counter()
            mimi.decode_frame(codes[i])
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                dec.append(dt)
            bar.update()
    mimi.reset()
    return enc, dec


def time_sequential(engine, frames: int, warmup: int, position: int, progress: _Progress = _NO_PROGRESS):
    """ConversationEngine.process, one frame after the other: (total ms per frame, per-stage ms lists)."""
    pcm = speechlike_pcm(warmup + frames, 1)
    engine.reset()
    _seek(engine.gen, position)
    totals: list[float] = []
    stages: dict[str, list[float]] = {}
    with progress(warmup + frames, "pipeline") as bar:
        for i in range(warmup + frames):
            t0 = time.perf_counter()
            result = engine.process(pcm[i])
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                totals.append(dt)
                for name, ms in result.timings_ms.items():
                    stages.setdefault(name, []).append(ms)
            bar.update()
    engine.reset()
    return totals, stages


def time_runner(
    engine,
    frames: int,
    warmup: int,
    position: int,
    paced: bool = False,
    progress: _Progress = _NO_PROGRESS,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """The threaded EngineRunner, as the app drives it.

    paced=False: kept busy (a new frame whenever fewer than 6 are in flight), so the rate at which
    frames come out is the pipeline's throughput; nothing is dropped.
    paced=True: one frame every 80 ms, like a microphone; reports latency (frame pushed -> its
    output ready) and how many frames the runner had to drop because it fell behind.
    """
    from .engine import EngineRunner

    total = warmup + frames
    pcm = speechlike_pcm(total, 2)
    engine.reset()
    _seek(engine.gen, position)
    cond = threading.Condition()
    out_times: list[float] = []
    latencies: list[float] = []
    errors: list[BaseException] = []

    def on_result(result) -> None:
        with cond:
            out_times.append(time.perf_counter())
            latencies.append(runner.stats.last_latency_ms)
            cond.notify_all()

    def on_error(e: BaseException) -> None:
        with cond:
            errors.append(e)
            cond.notify_all()

    in_flight_max = 6
    runner = EngineRunner(engine, on_result, max_pending=3 if paced else 2 * in_flight_max, on_error=on_error)
    if timeout_s is None:
        timeout_s = 60.0 + total * 10.0
    deadline = time.monotonic() + timeout_s
    bar = progress(total, "runner (real-time pace)" if paced else "runner")
    start = time.perf_counter()
    try:
        with runner:
            for i in range(total):
                if paced:
                    wait = start + i * FRAME_MS / 1e3 - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                else:
                    with cond:
                        while not errors and i - len(out_times) >= in_flight_max and time.monotonic() < deadline:
                            cond.wait(0.05)
                if errors or time.monotonic() > deadline:
                    break
                runner.push(pcm[i])
                bar.update()
            with cond:
                while not errors and len(out_times) + runner.stats.dropped < total and time.monotonic() < deadline:
                    cond.wait(0.05)
        stats = runner.stats
    finally:
        bar.close()
        engine.reset()
    if errors:
        raise RuntimeError(f"the engine runner failed: {errors[0]}") from errors[0]
    done = len(out_times)
    result: dict[str, Any] = {
        "frames_in": stats.frames_in,
        "frames_out": done,
        "dropped": stats.dropped,
        "timed_out": done + stats.dropped < total,
    }
    if paced:
        timed = latencies[warmup:] if len(latencies) > warmup else latencies
        result["latency"] = summarize(timed)
        result["keeps_up"] = stats.dropped == 0 and not result["timed_out"]
    else:
        first = min(warmup, max(done - 2, 0))
        if done - first >= 1 and done >= 2:
            span = out_times[done - 1] - out_times[first - 1] if first > 0 else out_times[done - 1] - start
            count = done - first
            ms = span * 1e3 / count
            result["ms_per_frame"] = round(ms, 3)
            result["frames_per_s"] = round(1e3 / ms, 3) if ms > 0 else None
            result["rtf"] = round(ms / FRAME_MS, 4)
            result["measured_frames"] = count
    return result


def long_session(
    run_step: Callable[[int], None],
    steps: int,
    warmup: int,
    window: int | None = None,
    progress: _Progress = _NO_PROGRESS,
    desc: str = "long session",
) -> dict[str, Any]:
    """Run `steps` steps; step time and memory over windows at the start, middle and end.

    A healthy session is flat: the same memory in the middle and at the end, and the same step
    time once the attention window has filled.
    """
    if window is None:
        window = max(5, min(200, steps // 20))
    window = max(1, min(window, steps // 3 if steps >= 3 else steps))
    mid_start = warmup + max(0, steps // 2 - window // 2)
    marks = {
        "start": (warmup, warmup + window),
        "middle": (mid_start, mid_start + window),
        "end": (warmup + steps - window, warmup + steps),
    }
    times = np.zeros(warmup + steps)
    snapshots: dict[str, dict[str, Any]] = {}
    with progress(warmup + steps, desc) as bar:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            run_step(i)
            times[i] = (time.perf_counter() - t0) * 1e3
            for name, (a, b) in marks.items():
                if i == b - 1:
                    snap = summarize(times[a:b])
                    snap.update(
                        first_step=a - warmup,
                        last_step=b - 1 - warmup,
                        mlx_active_mb=_mb(mx.get_active_memory()),
                        mlx_cache_mb=_mb(mx.get_cache_memory()),
                        rss_mb=_mb(rss_now_bytes()),
                    )
                    snapshots[name] = snap
            bar.update()
    mid, end = snapshots["middle"], snapshots["end"]
    mem_growth = round(end["mlx_active_mb"] - mid["mlx_active_mb"], 2)
    rss_growth = (
        round(end["rss_mb"] - mid["rss_mb"], 2) if end.get("rss_mb") is not None and mid.get("rss_mb") is not None else None
    )
    time_ratio = round(end["median_ms"] / mid["median_ms"], 3) if mid.get("median_ms") else None
    # Memory must not grow at all (MLX active memory is exact); RSS may wobble a little with the
    # allocator; step time on a shared machine is noisy, so allow 25 %.
    flat_memory = mem_growth <= 1.0 and (rss_growth is None or rss_growth <= 50.0)
    flat_time = time_ratio is not None and time_ratio <= 1.25
    return {
        "steps": steps,
        "warmup": warmup,
        "window": window,
        "start": snapshots["start"],
        "middle": mid,
        "end": end,
        "mlx_active_growth_mb": mem_growth,
        "rss_growth_mb": rss_growth,
        "end_over_middle_time": time_ratio,
        "flat_memory": flat_memory,
        "flat_time": flat_time,
        "flat": flat_memory and flat_time,
    }


def time_lm_steps(
    config_name: str, dtype: str, steps: int, warmup: int, seed: int = 0, position: int = 0
) -> dict[str, Any]:
    """Random weights in a named config, `steps` timed LmGen steps after `warmup` untimed ones.

    Used by benchmarks/compare_reference.py next to Kyutai's reference. Starts a fresh conversation
    (position 0) like the reference's own loop. `peak_memory_gb` is MLX's allocator peak during the
    step loop (weights + KV cache + activations); `rss_peak_gb` the whole process's peak, build included.
    """
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    cfg = preset(config_name)
    model, build_s = random_lm(cfg, dtype, seed)
    mx.reset_peak_memory()
    times = time_fused_steps(model, steps, warmup, seed, position)
    stats = summarize(times)
    return {
        "impl": "ours",
        "config": config_name,
        "dtype": canonical_dtype(dtype),
        **{k: stats[k] for k in ("median_ms", "p90_ms", "max_ms", "mean_ms")},
        "steps_per_s": round(1e3 / stats["median_ms"], 3),
        "peak_memory_gb": _gb(mx.get_peak_memory()),
        "rss_peak_gb": _gb(rss_peak_bytes()),
        "steps": steps,
        "warmup": warmup,
        "build_s": round(build_s, 2),
        "params": param_count(cfg),
        "weights_gb": _gb(weights_bytes(model)),
        "mlx_version": mx.__version__,
        "device": str(mx.default_device()),
    }


# ----------------------------------------------------------------------------------------------
# verdict
# ----------------------------------------------------------------------------------------------
def verdict(ms_per_frame: float | None, label: str, where: str, what: str = "", dropped: int = 0) -> tuple[str, bool | None]:
    """One line a user understands, and whether it keeps up (None: nothing measured)."""
    if ms_per_frame is None or not math.isfinite(ms_per_frame) or ms_per_frame <= 0:
        return f"no timing measured for {label}", None
    detail = f" ({ms_per_frame:.0f} ms of work per 80 ms frame{', ' + what if what else ''})"
    if ms_per_frame >= FRAME_MS or dropped:
        factor = max(ms_per_frame / FRAME_MS, 1.0)
        need = f"needs {factor:.1f}× more speed" if factor >= 1.05 else "needs a little more speed"
        drop = f"; dropped {dropped} frame{'s' if dropped != 1 else ''} at the real pace" if dropped else ""
        return f"{where} falls behind real time at {label}: {need}{detail}{drop}", False
    headroom = 1.0 - ms_per_frame / FRAME_MS
    if headroom < 0.10:
        return (
            f"{where} keeps up with real time at {label}, only just ({headroom:.0%} headroom): "
            f"expect glitches when other apps are busy{detail}",
            True,
        )
    return f"{where} keeps up with real time at {label} with {headroom:.0%} headroom{detail}", True


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .hub import add_model_args

    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.benchmark",
        description="Measure Moshi on this machine: LM step, depformer share, Mimi, full pipeline, load time, "
        "memory, and whether it keeps up with real time.",
        epilog="Examples: -q 4 | --moshi-weights model.q8.safetensors | --config small --dtype q4 | --long",
    )
    add_model_args(p)
    g = p.add_argument_group("random weights (nothing downloaded)")
    g.add_argument("--config", choices=sorted(PRESETS), help="random weights in this model config instead of files")
    g.add_argument(
        "--dtype", default=None, type=str.lower, choices=sorted(DTYPE_NAMES),
        help="with --config: f32, bf16, f16, q8 or q4 (default f32 for tiny, else bf16); with files: the compute "
        "dtype of unquantized weights (f32/bf16/f16)",
    )
    g.add_argument(
        "--save-load", action="store_true",
        help="with --config: also write the random weights to a temporary .safetensors and time load_lm on it",
    )
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="with --config: attention window of N steps instead of 3000 (e.g. a quick --long wrap-around)")
    g.add_argument("--demo", action="store_true", help="same as --config tiny --dtype f32 with the random demo Mimi")
    r = p.add_argument_group("run")
    r.add_argument("--steps", type=int, default=None, help=f"timed steps/frames per measurement (default {DEFAULT_STEPS}; "
                   f"{DEFAULT_LONG_STEPS} with --long)")
    r.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {DEFAULT_WARMUP})")
    r.add_argument("--position", default="full", help="session position the timed steps start at: 'full' (default: "
                   "attention window full, as after ~4 min of talk) or a number (0 = fresh conversation)")
    r.add_argument("--realtime-frames", type=int, default=None, metavar="N",
                   help=f"also feed N frames at the real 80 ms pace to measure latency and dropped frames (default "
                   f"min({DEFAULT_REALTIME_FRAMES}, --steps); 0 skips)")
    r.add_argument("--lm-only", action="store_true", help="skip Mimi and the pipeline (LM step and split only)")
    r.add_argument("--no-split", action="store_true", help="skip the temporal/depformer split")
    r.add_argument("--long", action="store_true", help=f"long session: {DEFAULT_LONG_STEPS} steps (tiny config unless a "
                   "model is given), step time and memory at the start, middle and end")
    r.add_argument("--long-pipeline", action="store_true", help="with --long: run the whole pipeline (Mimi too) each step")
    r.add_argument("--device", choices=["cpu", "gpu"], default=None, help="MLX default device (default: MLX's own choice)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", metavar="PATH", default=None, help="write all results as JSON here")
    r.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bar on stderr (default: only when stderr is a terminal)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _uses_files(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in ("quantize", "hf_repo", "moshi_weights"))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class _Loaded:
    lm: Lm
    config: LmConfig
    mimi_path: Path | None
    tokenizer_path: Path | None
    model: dict[str, Any]
    load: dict[str, Any]


def _load_model(args: argparse.Namespace, progress: _Progress) -> _Loaded:
    def layer_bar(desc: str):
        state: dict[str, Any] = {}

        def show(done: int, total: int) -> None:
            if "bar" not in state:
                state["bar"] = progress(total, desc)
            state["bar"].update()
            if done == total:
                state["bar"].close()

        return show

    if args.config is not None:
        name = args.config
        cfg = preset(name)
        if args.context is not None:
            if args.context < 1:
                raise ValueError("--context must be >= 1")
            cfg = dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, context=args.context))
        dtype = canonical_dtype(args.dtype or ("f32" if name == "tiny" else "bf16"))
        compute, quant = dtype_spec(dtype)
        lm, build_s = random_lm(cfg, dtype, args.seed, layer_bar("build"))
        load: dict[str, Any] = {"kind": "build+materialise random weights", "lm_s": round(build_s, 3)}
        if args.save_load:
            with tempfile.TemporaryDirectory(prefix="moshi-bench-") as tmp:
                path = Path(tmp) / f"moshi-{name}-{dtype}.safetensors"
                t0 = time.perf_counter()
                save_lm(lm, path)
                load["save_s"] = round(time.perf_counter() - t0, 3)
                load["file_gb"] = _gb(path.stat().st_size)
                del lm
                gc.collect()
                mx.clear_cache()
                t0 = time.perf_counter()
                lm = load_lm(path, cfg, compute if quant is None else None, layer_bar("load_lm"))
                load["load_lm_s"] = round(time.perf_counter() - t0, 3)
        ctx = f", context {cfg.transformer.context}" if args.context is not None else ""
        label = f"{name} {dtype} (random weights{ctx})"
        model = {
            "source": "random",
            "config": name,
            "dtype": dtype,
            "label": label,
        }
        mimi_path = Path(args.mimi_weights) if args.mimi_weights else None
        tok_path = Path(args.tokenizer) if args.tokenizer else None
    else:
        from .hub import model_files_from_args

        files = model_files_from_args(args)
        cfg = LmConfig.from_dict(files.lm_config) if files.lm_config else config_v0_1()
        compute = None
        if args.dtype is not None:
            dtype = canonical_dtype(args.dtype)
            if dtype not in _FLOAT:
                raise ValueError("--dtype q8/q4 is for random weights; for files use -q 8 / -q 4")
            compute = _FLOAT[dtype]
        t0 = time.perf_counter()
        lm = load_lm(files.moshi, cfg, compute, layer_bar("load_lm"))
        load = {"kind": "load_lm from file (OS file cache not flushed)", "lm_s": round(time.perf_counter() - t0, 3)}
        bits = files.quantize
        dtype = f"q{bits}" if bits else {mx.float32: "f32", mx.float16: "f16"}.get(lm.dtype, "bf16")
        label = f"-q {bits}" if bits else dtype
        model = {
            "source": "file",
            "config": "7b" if cfg == config_v0_1() else "from config.json",
            "dtype": dtype,
            "label": label,
            "path": str(files.moshi),
            "file_gb": _gb(Path(files.moshi).stat().st_size),
            "repo": files.repo,
        }
        mimi_path, tok_path = Path(files.mimi), Path(files.tokenizer)
    quant = None
    if model["dtype"] in ("q8", "q4"):
        bits = int(model["dtype"][1:])
        if model["source"] == "random":
            quant = {"bits": bits, "group_size": GROUP_SIZE_FOR_BITS[bits]}
        else:
            from .loading import inspect_checkpoint

            q = inspect_checkpoint(model["path"], cfg).quantization
            quant = {"bits": q.bits, "group_size": q.group_size} if q else None
    model["quantization"] = quant
    model["compute_dtype"] = str(lm.dtype).replace("mlx.core.", "")
    model["params"] = param_count(cfg)
    model["weights_gb"] = _gb(weights_bytes(lm))
    model["sizes"] = {
        "d_model": cfg.transformer.d_model,
        "num_layers": cfg.transformer.num_layers,
        "context": cfg.transformer.context,
        "dep_d_model": cfg.depformer.d_model,
        "dep_num_layers": cfg.depformer.num_layers,
        "generated_codebooks": cfg.generated_codebooks,
    }
    return _Loaded(lm, cfg, mimi_path, tok_path, model, load)


def _load_mimi(loaded: _Loaded, results: dict[str, Any]):
    from .mimi import Mimi

    random_mimi = loaded.mimi_path is None
    tok = None
    if random_mimi:
        from .demo import demo_assets

        files = demo_assets()
        loaded.mimi_path = files.mimi_path
        if loaded.tokenizer_path is None:
            loaded.tokenizer_path = files.tokenizer_path
    t0 = time.perf_counter()
    mimi = Mimi(loaded.mimi_path, num_codebooks=loaded.config.generated_codebooks)
    results["load"]["mimi_s"] = round(time.perf_counter() - t0, 3)
    if loaded.tokenizer_path is not None:
        from .tokenizer import TextTokenizer

        try:
            tok = TextTokenizer(loaded.tokenizer_path)
        except Exception:
            tok = None
    return mimi, tok, random_mimi


def _fmt_stats(s: dict[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['median_ms']:8.2f} {s['p90_ms']:8.2f} {s['max_ms']:8.2f}"


def format_table(res: dict[str, Any]) -> str:
    m, mod = res["machine"], res["model"]
    lines = [
        f"machine : {m['chip']} | {m['os']} | {m.get('memory_gb')} GB | MLX {m['mlx_version']} on {m['mlx_device']}",
        f"model   : {mod['label']} | {mod['params'] / 1e6:.0f}M params | weights {mod['weights_gb']} GB"
        + (f" | {mod['path']}" if mod.get("path") else ""),
        f"run     : {res['settings']['steps']} timed steps after {res['settings']['warmup']} warm-up, "
        f"starting at session position {res['settings']['start_position']}",
    ]
    load = res["load"]
    parts = [f"{load['kind']}: {load['lm_s']:.2f} s"]
    if "load_lm_s" in load:
        parts.append(f"load_lm from temp file ({load['file_gb']} GB): {load['load_lm_s']:.2f} s")
    if "mimi_s" in load:
        parts.append(f"Mimi: {load['mimi_s']:.2f} s")
    lines.append("load    : " + " | ".join(parts))
    lines.append("")
    if "lm_step" in res:
        lines.append(f"{'per 80 ms frame':<40} {'median':>8} {'p90':>8} {'max':>8}  ms")
    rows: list[tuple[str, dict | None]] = []
    if "lm_step" in res:
        rows.append(("LM step (LmGen.step)", res["lm_step"]))
    split = res.get("lm_split")
    if split:
        rows.append(("  temporal transformer + text", split["temporal"]))
        rows.append((f"  depformer ({split['depformer_share']:.0%} of the split step)", split["depformer"]))
    mimi = res.get("mimi")
    if mimi:
        rows.append(("Mimi encode", mimi["encode"]))
        rows.append(("Mimi decode", mimi["decode"]))
    pipe = res.get("pipeline", {})
    if "sequential" in pipe:
        rows.append(("pipeline, sequential (engine.process)", pipe["sequential"]["frame"]))
    if "realtime" in pipe and pipe["realtime"].get("latency", {}).get("n"):
        rows.append(("latency at real pace (in -> out)", pipe["realtime"]["latency"]))
    for name, stats in rows:
        lines.append(f"{name:<40} {_fmt_stats(stats)}")
    if "runner" in pipe and "ms_per_frame" in pipe["runner"]:
        r = pipe["runner"]
        lines.append(f"{'pipeline, threaded (EngineRunner)':<40} {r['ms_per_frame']:8.2f}  per frame, throughput "
                     f"({r['frames_per_s']:.1f} frames/s)")
    if "realtime" in pipe:
        rt = pipe["realtime"]
        lines.append(f"{'real-time pace':<40} {rt['frames_out']} frames out of {rt['frames_in']} in, {rt['dropped']} dropped")
    if res.get("rtf") is not None:
        lines.append(f"{'real-time factor':<40} {res['rtf']:8.3f}  ({res['rtf_basis']}; < 1 keeps up)")
    mem = res["memory"]
    lines.append(
        f"{'peak memory':<40} MLX {mem['mlx_peak_gb']} GB (allocator, whole run; {mem['mlx_peak_steps_gb']} GB during "
        f"the steps) | process RSS {mem['rss_peak_gb']} GB (ru_maxrss)"
    )
    long = res.get("long")
    if long:
        lines.append("")
        lines.append(f"long session: {long['steps']} steps, windows of {long['window']} steps")
        lines.append(f"{'':<10} {'steps':>13} {'median':>8} {'p90':>8} {'max':>8} {'MLX MB':>9} {'RSS MB':>9}")
        for name in ("start", "middle", "end"):
            s = long[name]
            lines.append(
                f"{name:<10} {s['first_step']:>6}-{s['last_step']:<6} {s['median_ms']:8.2f} {s['p90_ms']:8.2f} "
                f"{s['max_ms']:8.2f} {s['mlx_active_mb']:9.1f} {s['rss_mb'] if s['rss_mb'] is not None else '-':>9}"
            )
        lines.append(
            f"{'':<10} {'flat' if long['flat'] else 'NOT FLAT'}: MLX memory {long['mlx_active_growth_mb']:+.1f} MB and "
            f"RSS {long['rss_growth_mb'] if long['rss_growth_mb'] is not None else '?'} MB from middle to end, "
            f"step time x{long['end_over_middle_time']}"
            + (f" (start is before the {long['context']}-step window fills)" if long.get("context") and
               long["middle"]["first_step"] > long["context"] else "")
        )
    lines.append("")
    lines.append("verdict : " + res["verdict"])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command line does, returning the JSON-ready results (also printed/written by main)."""
    set_device(args.device)
    if args.demo:
        args.config = args.config or "tiny"
        args.dtype = args.dtype or "f32"
    if args.long and args.config is None and not _uses_files(args):
        args.config = "tiny"
    if args.config is None and not _uses_files(args):
        raise ValueError(
            "choose a model: -q 4, -q 8, --hf-repo kyutai/moshiko-mlx-bf16, --moshi-weights PATH, "
            "or random weights with --config tiny|small|7b [--dtype f32|bf16|q8|q4]"
        )
    if args.config is not None and _uses_files(args):
        raise ValueError("--config (random weights) cannot be combined with -q/--hf-repo/--moshi-weights")
    if args.context is not None and args.config is None:
        raise ValueError("--context is for random weights (--config); a file's config.json sets its own")
    if args.save_load and args.config is None:
        raise ValueError("--save-load is for random weights (--config); a file is timed by loading it")
    steps = args.steps if args.steps is not None else (DEFAULT_LONG_STEPS if args.long else DEFAULT_STEPS)
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP
    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    realtime = args.realtime_frames if args.realtime_frames is not None else min(DEFAULT_REALTIME_FRAMES, steps)
    if realtime < 0:
        raise ValueError("--realtime-frames must be >= 0")
    resolve_position(args.position, preset("tiny"))  # reject a bad --position before loading anything
    progress = _Progress(sys.stderr.isatty() if args.progress is None else args.progress)

    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m moshi_mlx.benchmark", *(sys.argv[1:] if args.argv is None else args.argv)]),
        "machine": machine_info(),
    }
    loaded = _load_model(args, progress)
    cfg = loaded.config
    position = 0 if args.long else resolve_position(args.position, cfg)
    results["model"] = loaded.model
    results["load"] = loaded.load
    results["settings"] = {
        "steps": steps,
        "warmup": warmup,
        "start_position": position,
        "context": cfg.transformer.context,
        "seed": args.seed,
        "realtime_frames": 0 if (args.lm_only or args.long) else realtime,
        "long": bool(args.long),
    }
    peak_after_load = mx.get_peak_memory()
    mx.reset_peak_memory()
    lm = loaded.lm
    need_mimi = not args.lm_only and (not args.long or args.long_pipeline)
    mimi = tok = None
    if need_mimi:
        mimi, tok, random_mimi = _load_mimi(loaded, results)

    if args.long:
        if args.long_pipeline:
            from .engine import ConversationEngine, EngineSettings

            engine = ConversationEngine(lm, mimi, tok, EngineSettings(seed=args.seed))
            pcm = speechlike_pcm(64, 3)

            def step(i: int) -> None:
                engine.process(pcm[i % 64])

            desc = "long session (pipeline)"
        else:
            from .generate import LmGen

            gen = LmGen(lm, seed=args.seed)
            codes = random_user_codes(cfg, 256, args.seed)

            def step(i: int) -> None:
                gen.step(codes[i % 256])

            desc = "long session (LM)"
        long = long_session(step, steps, warmup, progress=progress, desc=desc)
        long["context"] = cfg.transformer.context
        long["pipeline"] = bool(args.long_pipeline)
        results["long"] = long
        basis = long["end"]["median_ms"]
        results["rtf"] = round(basis / FRAME_MS, 4)
        results["rtf_basis"] = ("pipeline" if args.long_pipeline else "LM step") + " median over the last window"
        what = "LM only, no Mimi" if not args.long_pipeline else "sequential pipeline"
        line, keeps = verdict(basis, loaded.model["label"], _where(results["machine"]), what)
        flat = "memory and step time stay flat" if long["flat"] else (
            "memory GROWS" if not long["flat_memory"] else "step time drifts up")
        results["verdict"] = f"{line}; over {steps} steps {flat}"
        results["keeps_up"] = keeps
    else:
        results["lm_step"] = summarize(time_fused_steps(lm, steps, warmup, args.seed, position, progress))
        results["lm_step"]["steps_per_s"] = round(1e3 / results["lm_step"]["median_ms"], 3)
        if not args.no_split:
            temporal, dep = time_split_steps(lm, steps, warmup, args.seed, position, progress)
            t, d = summarize(temporal), summarize(dep)
            split_total = [a + b for a, b in zip(temporal, dep)]
            results["lm_split"] = {
                "temporal": t,
                "depformer": d,
                "total": summarize(split_total),
                "depformer_share": round(d["median_ms"] / (t["median_ms"] + d["median_ms"]), 4),
                "note": "a sync between the two halves; 'total' minus lm_step median is that sync's cost",
            }
        if need_mimi:
            enc, dec = time_mimi(mimi, steps, min(warmup, 5), args.seed, progress)
            results["mimi"] = {
                "encode": summarize(enc),
                "decode": summarize(dec),
                "path": str(loaded.mimi_path),
                "random_weights": random_mimi,
                "dtype": mimi.dtype,
            }
            from .engine import ConversationEngine, EngineSettings

            engine = ConversationEngine(lm, mimi, tok, EngineSettings(seed=args.seed))
            engine.warmup(frames=min(warmup, 5))
            totals, stages = time_sequential(engine, steps, warmup, position, progress)
            seq = {"frame": summarize(totals), "stages": {k: summarize(v) for k, v in stages.items()}}
            seq["rtf"] = round(seq["frame"]["median_ms"] / FRAME_MS, 4)
            pipe: dict[str, Any] = {"sequential": seq}
            pipe["runner"] = time_runner(engine, steps, warmup, position, paced=False, progress=progress)
            if realtime > 0:
                pipe["realtime"] = time_runner(engine, realtime, min(warmup, 5), position, paced=True, progress=progress)
            results["pipeline"] = pipe
            runner_ms = pipe["runner"].get("ms_per_frame")
            if runner_ms is not None:
                basis, results["rtf_basis"] = runner_ms, "threaded pipeline throughput"
                what = "threaded pipeline"
            else:
                basis, results["rtf_basis"] = seq["frame"]["median_ms"], "sequential pipeline median"
                what = "sequential pipeline"
            dropped = pipe.get("realtime", {}).get("dropped", 0)
        else:
            basis, results["rtf_basis"] = results["lm_step"]["median_ms"], "LM step median, Mimi not included"
            what, dropped = "LM only, Mimi not included", 0
        results["rtf"] = round(basis / FRAME_MS, 4)
        results["headroom"] = round(1.0 - basis / FRAME_MS, 4)
        line, keeps = verdict(basis, loaded.model["label"], _where(results["machine"]), what, dropped)
        p90 = results["lm_step"]["p90_ms"]
        if keeps and p90 >= FRAME_MS:
            line += f"; but 1 LM step in 10 takes {p90:.0f} ms or more, longer than a frame"
        results["verdict"] = line
        results["keeps_up"] = keeps

    results["memory"] = {
        "mlx_peak_gb": _gb(max(peak_after_load, mx.get_peak_memory())),
        "mlx_peak_load_gb": _gb(peak_after_load),
        "mlx_peak_steps_gb": _gb(mx.get_peak_memory()),
        "mlx_active_gb": _gb(mx.get_active_memory()),
        "rss_peak_gb": _gb(rss_peak_bytes()),
        "kv_cache_gb": _gb(2 * cfg.transformer.num_layers * cfg.transformer.context * cfg.transformer.d_model * lm.dtype.size),
        "note": "mlx_*: MLX allocator (weights + KV cache + activations; on Apple silicon this is the GPU's share of "
        "unified memory); rss_peak_gb: the process's peak resident set (resource ru_maxrss), incl. Python and Mimi",
    }
    if mimi is not None:
        mimi.close()
    return results


def _where(machine: dict[str, Any]) -> str:
    if sys.platform == "darwin":
        chip = machine.get("chip") or "Mac"
        return f"this Mac ({chip}, MLX on {machine['mlx_device']})"
    return f"this machine ({machine.get('chip')}, MLX on {machine['mlx_device']})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        results = run(args)
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    except (ValueError, RuntimeError, OSError, WeightsError) as e:
        # HubError, MimiError, WeightsError, TokenizerError are all one-line messages.
        _log(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 2
    print(format_table(results), flush=True)
    if args.json:
        path = Path(args.json)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------------------------
# memory per --kv-bits (LM alone and full pipeline), kept apart from the timing code above
def memory_at_position(
    lm: Lm, kv_bits: int, position: int, steps: int = 2, mimi=None, seed: int = 0, context: int | None = None
) -> dict[str, Any]:
    """Step the LM `steps` times past `position` with a `kv_bits` cache; with `mimi`, each step also encodes
    and decodes one frame (the full pipeline). Reports MLX's peak and the process RSS (now and peak).

    Process peak RSS is monotonic: measure settings from the smallest footprint to the largest.
    """
    from .generate import LmGen

    gen = LmGen(lm, seed=seed, kv_bits=kv_bits, context=context)
    _seek(gen, position)
    codes = random_user_codes(lm.config, steps + 1, seed)
    pcm = speechlike_pcm(steps + 1, seed)
    mx.synchronize()
    mx.reset_peak_memory()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        user = codes[i]
        if mimi is not None:
            user = mimi.encode_frame(pcm[i])[: lm.config.user_codebooks]
        out = gen.step(user)
        if mimi is not None:
            mimi.decode_frame(out.audio_codes if out is not None else np.zeros(mimi.num_codebooks, np.int32))
        if i:  # the first step is a warm-up
            times.append((time.perf_counter() - start) * 1e3)
    return {
        "kv_bits": kv_bits,
        "position": position,
        "pipeline": mimi is not None,
        "kv_cache_gb": _gb(gen._cache.nbytes),
        "weights_gb": _gb(weights_bytes(lm)),
        "mlx_peak_gb": _gb(mx.get_peak_memory()),
        "rss_now_gb": _gb(rss_now_bytes()),
        "rss_peak_gb": _gb(rss_peak_bytes()),
        "step_ms_median": round(float(np.median(times)), 1),
    }
