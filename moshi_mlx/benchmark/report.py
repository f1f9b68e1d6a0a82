"""What a user reads: the verdict line and the table (the JSON is `BenchResult.to_json`)."""

from __future__ import annotations

import math

from ..audio.frames import FRAME_MS
from .measure import Stats
from .results import BenchResult, Verdict


def pace(ms_per_frame: float) -> str:
    """Keeping up, said one way everywhere: the headroom when it keeps up, the speed-up it needs when not.

    (A bare "0.28x real time" reads as faster than real time to some and slower to others.)
    """
    load = ms_per_frame / FRAME_MS
    if load >= 1.0:
        return f"needs {load:.1f}x more speed" if load >= 1.05 else "needs a little more speed"
    headroom = 1.0 - load
    return f"keeps up with {headroom:.0%} headroom" if headroom >= 0.10 else f"keeps up only just ({headroom:.0%} headroom)"


def verdict(
    ms_per_frame: float, label: str, where: str, basis: str, dropped: int = 0, p90_ms: float | None = None
) -> Verdict:
    """One line a user understands, e.g. "this Mac (...) keeps up with real time at -q 4 with 35% headroom"."""
    if not math.isfinite(ms_per_frame) or ms_per_frame <= 0:
        raise ValueError(f"no usable timing for the verdict ({ms_per_frame!r} ms)")
    rtf = ms_per_frame / FRAME_MS
    keeps_up = rtf < 1.0 and not dropped
    said = pace(ms_per_frame)
    if keeps_up:
        line = f"{where} keeps up with real time at {label}{said.removeprefix('keeps up')}"
        if rtf > 0.9:
            line += ": expect glitches when other apps are busy"
        if p90_ms is not None and p90_ms >= FRAME_MS:
            line += f"; but 1 LM step in 10 takes {p90_ms:.0f} ms or more, longer than a frame"
    else:
        line = f"{where} falls behind real time at {label}: {said if rtf >= 1.0 else 'needs a little more speed'}"
        if dropped:
            line += f"; dropped {dropped} frame{'s' if dropped != 1 else ''} at the real pace"
    line += f" ({ms_per_frame:.0f} ms of work per 80 ms frame, {basis})"
    return Verdict(line, keeps_up, round(ms_per_frame, 3), basis, round(rtf, 4), round(1.0 - rtf, 4))


def _row(name: str, stats: Stats | None) -> str:
    if stats is None:
        return f"{name:<46} {'-':>8}"
    return f"{name:<46} {stats.median_ms:8.2f} {stats.p90_ms:8.2f} {stats.max_ms:8.2f}"


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(res: BenchResult) -> str:
    m, model, s = res.machine, res.model, res.settings
    lines = [
        f"machine : {m.chip} | {m.os} | {m.memory_gb} GB | MLX {m.mlx_version} on {m.mlx_device}",
        f"model   : {model.label} | {model.params / 1e6:.0f}M params | weights {model.weights_gb} GB"
        + (f" | KV cache {s.kv_bits}-bit" if s.kv_bits else "")
        + (f" | {model.path or model.repo}" if model.path or model.repo else ""),
        f"run     : {s.steps} timed steps after {s.warmup} warm-up, from session position {s.start_position} "
        f"(window {s.context})",
        f"load    : assets.load() {res.load.load_s:.2f} s (LM + Mimi + tokenizer)"
        + (f" | random weights built and written ({res.load.file_gb} GB) in {res.load.write_random_s:.2f} s"
           if res.load.write_random_s is not None else ""),
        "",
    ]
    if res.lm is not None or res.mimi is not None or res.pipeline is not None:
        lines.append(f"{'per 80 ms frame':<46} {'median':>8} {'p90':>8} {'max':>8}  ms")
    if res.lm is not None:
        lines.append(_row("LM step (LmGen.step)", res.lm.step))
        if res.lm.temporal is not None:
            lines.append(_row("  temporal transformer + text (timed halves)", res.lm.temporal))
            lines.append(_row(f"  depformer ({res.lm.depformer_share:.0%} of the timed halves)", res.lm.depformer))
    g = res.guidance
    if g is not None:
        lines.append(_row("LM step, CFG off (cfg_coef 1: one row)", g.off))
        lines.append(_row(f"LM step, CFG on (cfg_coef {g.coef:g}: two rows, x{g.cost:.2f})", g.on))
    pt = res.prompt
    if pt is not None:
        lines.append(f"{f'persona prompt ({pt.steps} steps), played (cold)':<46} {pt.cold_ms:8.1f}  ms, median of {pt.runs}")
        lines.append(f"{'persona prompt, restored from its snapshot':<46} {pt.warm_ms:8.1f}  ms; snapshot "
                     f"{pt.snapshot_mb:.1f} MB")
    if res.mimi is not None:
        lines.append(_row("Mimi encode", res.mimi.encode))
        lines.append(_row("Mimi decode", res.mimi.decode))
    p = res.pipeline
    if p is not None:
        lines.append(_row("pipeline, sequential (engine.process)", p.sequential.frame))
        if p.realtime is not None and p.realtime.latency is not None:
            lines.append(_row("latency at the real pace (in -> out)", p.realtime.latency))
        if p.threaded.ms_per_frame is not None:
            lines.append(f"{'pipeline, threaded (EngineRunner)':<46} {p.threaded.ms_per_frame:8.2f}  per frame (throughput)")
        if p.realtime is not None:
            rt = p.realtime
            lines.append(f"{'real-time pace':<46} {rt.frames_out} frames out of {rt.frames_in} in, {rt.dropped} dropped")
    if res.transcribe_user is not None:
        from .stt import on_top_lines

        lines += on_top_lines(res.transcribe_user)
    v = res.verdict
    lines.append(f"{'real-time factor':<46} {v.rtf:8.3f}  (work / 80 ms, {v.basis}): {pace(v.ms_per_frame)}")
    mem = res.memory
    lines.append("")
    lines.append(f"{'memory, GB':<46} {'MLX peak':>9} {'RSS peak':>9}")
    if mem.lm is not None:
        lines.append(f"{'LM alone (steps from ' + str(s.start_position) + ')':<46} {_gb(mem.lm.mlx_peak_gb):>9} "
                     f"{_gb(mem.lm.rss_peak_gb):>9}")
    if mem.pipeline is not None:
        lines.append(f"{'full pipeline (LM + Mimi both ways)':<46} {_gb(mem.pipeline.mlx_peak_gb):>9} "
                     f"{_gb(mem.pipeline.rss_peak_gb):>9}")
    lines.append(f"{'whole run (load included)':<46} {_gb(mem.mlx_peak_gb):>9} {_gb(mem.rss_peak_gb):>9}")
    lines.append(f"{'by part':<46} weights {mem.weights_gb}, KV cache {_gb(mem.kv_cache_gb)}, "
                 f"activations + allocator cache {_gb(mem.activations_gb)}")
    lines.append(f"{'':<46} Mimi ({mem.mimi_note or f'{mem.mimi_instances} rustymimi instances'}) {_gb(mem.mimi_gb)}, "
                 f"the rest (Python, libraries, buffers, loading) {_gb(mem.rest_gb)}")
    if res.long is not None:
        lines += ["", *_long_lines(res)]
    lines += ["", "verdict : " + v.line]
    return "\n".join(lines)


def _long_lines(res: BenchResult) -> list[str]:
    long = res.long
    what = "whole pipeline" if long.pipeline else "LM only"
    lines = [
        f"long session ({what}): {long.steps} steps = {long.steps * FRAME_MS / 60e3:.1f} min of audio, "
        f"windows of {long.window} steps",
        f"{'':<8} {'steps':>13} {'median':>8} {'p90':>8} {'max':>8} {'MLX MB':>9} {'RSS MB':>9}",
    ]
    for name in ("start", "middle", "end"):
        w = getattr(long, name)
        lines.append(f"{name:<8} {w.first_step:>6}-{w.last_step:<6} {w.time.median_ms:8.2f} {w.time.p90_ms:8.2f} "
                     f"{w.time.max_ms:8.2f} {w.mlx_active_mb:9.1f} {w.rss_mb:9.1f}")
    for mark in long.minutes:
        lines.append(f"{'minute ' + str(mark.minute):<8} {'at step ' + str(mark.step):>13} {'':>26} "
                     f"{mark.mlx_active_mb:9.1f} {mark.rss_mb:9.1f}")
    state = "flat" if long.flat else ("memory GROWS" if not long.flat_memory else "step time drifts up")
    lines.append(f"{'':<8} {state}: MLX {long.mlx_active_growth_mb:+.1f} MB, RSS {long.rss_growth_mb:+.1f} MB from "
                 f"middle to end; step time x{long.end_over_middle_time}")
    return lines
