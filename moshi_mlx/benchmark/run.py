"""Orchestration: load through the app's front door, run the measurements in order, build the result."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from .. import cli
from ..cli.flags import settings_from_args
from ..engine import ConversationEngine
from ..errors import MoshiError
from ..memory import rss_peak_bytes
from ..models.cache import DEFAULT_KV_BITS
from .args import build_parser, check_args, start_position
from .loaded import PRECISIONS, Loaded, load_model, scratch_dir
from .long import LongRun, long_session
from .machine import Machine, machine_info
from .measure import MemoryProbe, PhaseMemory, gb
from .pipeline import time_mimi, time_prompt, time_runner, time_sequential
from .report import format_table, verdict
from .results import BenchResult, Memory, Pipeline, Settings
from .steps import (
    LmTimes,
    engine_settings,
    kv_cache_bytes,
    new_generator,
    time_guidance,
    time_lm,
    user_codes,
)


def kv_cache(loaded: Loaded) -> tuple[int, int]:
    """(KV bits, attention window) the memory plan chose, as the app would run (--kv-bits, --max-memory)."""
    plan = loaded.assets.memory
    if plan is None:  # loaded without a plan: the app's defaults
        return DEFAULT_KV_BITS, loaded.assets.lm.config.transformer.context
    return plan.kv_bits, plan.context


def _set_device(name: str | None) -> None:
    if name == "gpu":
        if not mx.is_available(mx.gpu):
            # a fact about the machine, not a bug: one line for the user, no type name
            raise MoshiError("--device gpu: this MLX build has no GPU backend (install MLX with Metal or CUDA)")
        mx.set_default_device(mx.gpu)
    elif name == "cpu":
        mx.set_default_device(mx.cpu)


def _settings(args: argparse.Namespace, context: int, position: int, kv_bits: int) -> Settings:
    return Settings(
        steps=args.steps,
        warmup=args.warmup,
        start_position=position,
        context=context,
        seed=args.seed,
        realtime_frames=0 if (args.lm_only or args.long) else args.realtime_frames,
        kv_bits=kv_bits,
        split=not (args.no_split or args.long),
        long=args.long,
    )


def _short_run(args: argparse.Namespace, loaded: Loaded, position: int, progress: cli.Progress, machine: Machine) -> dict:
    """LM alone, then Mimi and the pipeline, each phase with its own memory peaks."""
    assets, (kv, window) = loaded.assets, kv_cache(loaded)
    sampling = settings_from_args(args, assets.lm.config)
    probe = MemoryProbe()
    lm = time_lm(assets.lm, args.steps, args.warmup, position, args.seed, kv, not args.no_split, progress,
                 probe.sample, sampling.text, sampling.audio, window, sampling.condition, sampling.cfg_coef)
    out: dict[str, Any] = {"lm": lm, "lm_memory": probe.result()}
    if sampling.has_prompt:  # a persona prompt: what a conversation's start costs, played and restored
        engine = ConversationEngine(assets.lm, assets.mimi, assets.tokenizer, engine_settings(sampling, kv, window),
                                    voices_dir=assets.voices_dir)
        try:
            out["prompt"] = time_prompt(engine)
        finally:
            engine.close()
        sampling = replace(sampling, text_prompt=None, voice=None)  # the pipeline is timed without one
    if assets.lm.config.is_conditioned:  # a conditioned model: what guidance costs per step
        out["guidance"] = time_guidance(assets.lm, args.steps, args.warmup, position, args.seed, kv, progress,
                                        sampling.text, sampling.audio, window, sampling.condition, sampling.cfg_coef)
    if args.lm_only:
        out["verdict"] = verdict(lm.step.median_ms, loaded.info.label, machine.where(), "LM alone, Mimi not included",
                                 p90_ms=lm.step.p90_ms)
        return out
    probe = MemoryProbe()
    short_warmup = min(args.warmup, 5)
    out["mimi"] = time_mimi(assets.mimi, args.steps, short_warmup, args.seed, progress)
    engine = ConversationEngine(assets.lm, assets.mimi, assets.tokenizer, engine_settings(sampling, kv, window))
    try:
        engine.warmup(frames=short_warmup)
        sequential = time_sequential(engine, args.steps, args.warmup, position, progress, probe.sample)
        threaded = time_runner(engine, args.steps, args.warmup, position, False, progress, probe.sample)
        realtime = None
        if args.realtime_frames > 0:
            realtime = time_runner(engine, args.realtime_frames, short_warmup, position, True, progress, probe.sample)
        if args.transcribe_user is not None:
            out["transcribe_user"] = _time_user_stt(args, engine, progress)
    finally:
        engine.close()
    out["pipeline"] = Pipeline(sequential, threaded, realtime)
    out["pipeline_memory"] = probe.result()
    if threaded.ms_per_frame is not None:
        basis, ms = "threaded pipeline", threaded.ms_per_frame
    else:
        basis, ms = "sequential pipeline", sequential.frame.median_ms
    dropped = realtime.dropped if realtime is not None else 0
    out["verdict"] = verdict(ms, loaded.info.label, machine.where(), basis, dropped, lm.step.p90_ms)
    return out


def _time_user_stt(args: argparse.Namespace, engine: ConversationEngine, progress: cli.Progress):
    """--transcribe-user: the app's STT model (or the demo's stand-in) beside Moshi, frame by frame."""
    from .stt import time_on_top

    _, resolved = cli.resolve_user_stt(args)
    stt = cli.load_user_stt(args, resolved, log=cli.say)
    try:
        return time_on_top(engine, stt.lm, stt.mimi, stt.description, args.steps, min(args.warmup, 5))
    finally:
        stt.close()


def _stt_only(args: argparse.Namespace, argv: list[str] | None) -> int:
    """--stt-only: each STT size alone, random weights, through the demo's random Mimi (32 codebooks)."""
    import json

    from ..audio.codec_choice import CodecChoice, open_mimi
    from ..model_files.checkpoint import DTYPES
    from ..model_files.stand_ins import demo_assets
    from .stt import random_stt, stt_lines, time_stt

    _set_device(args.device)
    machine = machine_info()
    dtype = DTYPES[args.dtype] if args.dtype else mx.bfloat16
    mimi = open_mimi(demo_assets().mimi_path, 32, CodecChoice.from_args(args), cli.say)
    rows = []
    try:
        for size in args.stt_sizes:
            cli.say(f"STT {size}: building random weights")
            lm = random_stt(size, args.quantize, dtype)
            rows.append(time_stt(size, lm, mimi, args.steps, args.warmup, args.quantize))
            cli.say(stt_lines(rows[-1:])[1])  # each size as it is done: a long run keeps what it measured
            del lm
            mx.clear_cache()
    finally:
        mimi.close()
    print("\n".join([f"machine : {machine.chip} | {machine.os} | MLX {machine.mlx_version} on {machine.mlx_device}",
                      f"run     : {args.steps} timed frames after {args.warmup} warm-up, Mimi "
                      f"{getattr(mimi, 'memory_note', '')}", "", *stt_lines(rows)]), flush=True)
    if args.json:
        from dataclasses import asdict

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m moshi_mlx.benchmark", *(sys.argv[1:] if argv is None else argv)])
        path.write_text(json.dumps({"command": command, "machine": asdict(machine),
                                    "stt": [asdict(r) for r in rows]}, indent=2) + "\n")
        cli.say(f"wrote {path}")
    return 0


def _long_run(args: argparse.Namespace, loaded: Loaded, progress: cli.Progress, machine: Machine) -> dict:
    assets, (kv, window) = loaded.assets, kv_cache(loaded)
    sampling = settings_from_args(args, assets.lm.config)
    probe = MemoryProbe()
    engine = None
    if args.long_pipeline:
        from .pipeline import speechlike_pcm

        engine = ConversationEngine(assets.lm, assets.mimi, assets.tokenizer, engine_settings(sampling, kv, window))
        pcm = speechlike_pcm(64, 3)
        gen = engine.gen

        def step(i: int) -> None:
            engine.process(pcm[i % 64])
    else:
        gen = new_generator(assets.lm, sampling.text, sampling.audio, args.seed, kv, window, sampling.condition,
                            sampling.cfg_coef)
        codes = user_codes(assets.lm.config, 256, args.seed)

        def step(i: int) -> None:
            gen.step(codes[i % 256])

    try:
        long: LongRun = long_session(step, args.steps, args.warmup, args.long_pipeline, progress)
    finally:
        if engine is not None:
            engine.close()
    basis = "whole pipeline, sequential" if args.long_pipeline else "LM alone, Mimi not included"
    v = verdict(long.end.time.median_ms, loaded.info.label, machine.where(), basis + ", last window")
    state = "memory and step time stay flat" if long.flat else (
        "memory GROWS" if not long.flat_memory else "step time drifts up")
    v = replace(v, line=f"{v.line}; over {long.steps} steps {state}")
    memory = probe.result()
    return {"long": long, "verdict": v, "kv": kv_cache_bytes(gen),
            "lm_memory": None if args.long_pipeline else memory,
            "pipeline_memory": memory if args.long_pipeline else None}


def run(args: argparse.Namespace, argv: list[str] | None = None) -> BenchResult:
    """Everything the command line does; returns the result (printed and written by `main`)."""
    _set_device(args.device)
    progress = cli.Progress(args.progress)
    machine = machine_info()
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with scratch_dir() as scratch:
        loaded = load_model(args, Path(scratch), cli.say, progress.callback("random weights"))
        kv_bits, context = kv_cache(loaded)
        position = 0 if args.long else start_position(args.position, context)
        try:
            out = _long_run(args, loaded, progress, machine) if args.long else _short_run(
                args, loaded, position, progress, machine)
        finally:
            loaded.assets.mimi.close()
    lm: LmTimes | None = out.get("lm")
    phases: list[PhaseMemory] = [m for m in (out.get("lm_memory"), out.get("pipeline_memory")) if m is not None]
    kv = lm.kv_cache_gb if lm is not None else gb(out.get("kv"))
    memory = Memory(
        lm=out.get("lm_memory"),
        pipeline=out.get("pipeline_memory"),
        mlx_peak_gb=max([loaded.load.mlx_peak_gb, *(m.mlx_peak_gb for m in phases)]),
        rss_peak_gb=gb(rss_peak_bytes()),
        weights_gb=loaded.info.weights_gb,
        kv_cache_gb=kv,
        mimi_gb=gb(loaded.assets.mimi.resident_bytes),
        mimi_instances=loaded.assets.mimi.live_instances,
        mimi_note=loaded.assets.mimi.memory_note,
        mimi_in_mlx_gb=gb(loaded.assets.mimi.mlx_bytes),
    )
    command = " ".join(["python -m moshi_mlx.benchmark", *(sys.argv[1:] if argv is None else argv)])
    return BenchResult(
        created=created,
        command=command,
        machine=machine,
        model=loaded.info,
        load=loaded.load,
        settings=_settings(args, context, position, kv_bits),
        memory=memory,
        verdict=out["verdict"],
        lm=lm,
        guidance=out.get("guidance"),
        mimi=out.get("mimi"),
        pipeline=out.get("pipeline"),
        long=out.get("long"),
        prompt=out.get("prompt"),
        transcribe_user=out.get("transcribe_user"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return cli.run(parser, lambda args: _main(parser, args, argv), argv)


def _main(parser, args, argv: list[str] | None) -> int:
    args = check_args(parser, args)
    if args.stt_only:
        return _stt_only(args, argv)
    result = run(args, argv)
    print(format_table(result), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.to_json())
        cli.say(f"wrote {path}")
    return 0


def time_lm_steps(config_name: str, precision: str, steps: int, warmup: int, seed: int = 0, position: int = 0) -> dict:
    """LM steps of random weights in a named config, for benchmarks/compare_reference.py.

    `precision` is the reference's spelling (f32, bf16, q8, q4). Same path as the command line
    (published layout written, loaded through `assets.load()`); a fresh conversation by default,
    like the reference's own loop. `peak_memory_gb` is MLX's peak during the steps.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    quantize, dtype = PRECISIONS[precision]
    argv = ["--config", config_name, "--steps", str(steps), "--warmup", str(warmup), "--seed", str(seed),
            "--position", str(position), "--lm-only", "--no-split", "--no-progress"]
    argv += ["-q", str(quantize)] if quantize else ["--dtype", dtype]
    parser = build_parser()
    res = run(check_args(parser, parser.parse_args(argv)), argv)
    step = res.lm.step
    return {
        "impl": "ours",
        "config": config_name,
        "dtype": precision,
        "median_ms": step.median_ms,
        "p90_ms": step.p90_ms,
        "max_ms": step.max_ms,
        "mean_ms": step.mean_ms,
        "steps_per_s": res.lm.steps_per_s,
        "peak_memory_gb": res.memory.lm.mlx_peak_gb,
        "rss_peak_gb": res.memory.rss_peak_gb,
        "steps": steps,
        "warmup": warmup,
        "build_s": res.load.write_random_s,
        "load_s": res.load.load_s,
        "params": res.model.params,
        "weights_gb": res.model.weights_gb,
        "mlx_version": mx.__version__,
        "device": str(mx.default_device()),
    }
