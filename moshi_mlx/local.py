"""Talk to Moshi in the terminal: ``python -m moshi_mlx.local -q 4`` (``--demo`` runs with no download).

Thin over the library: :mod:`moshi_mlx.assets` loads the model, :class:`moshi_mlx.engine.EngineRunner`
runs it on worker threads, :class:`moshi_mlx.audio.DuplexAudio` moves 80 ms frames between the
sound devices and the runner. This module only wires them together and talks to the user:
start-up time, Moshi's words as they come (stdout), and how far behind real time the model is (stderr).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time
from collections import deque

from . import cli
from .audio import (
    FRAME_SIZE,
    SAMPLE_RATE,
    AudioDeviceError,
    DuplexAudio,
    list_devices,
)
from .errors import first_line
from .terminal import Display as _Display
from .terminal import (
    add_audio_args,
    add_record_arg,
    exit_now,
    lag_status,
    make_recorder,
    save_recording,
    sigterm_interrupts,
)
from .terminal import log as _log
from .terminal import make_echo_canceller as _make_echo_canceller
from .terminal import sigint_ignored as _sigint_ignored

FRAME_S = FRAME_SIZE / SAMPLE_RATE


def build_parser() -> argparse.ArgumentParser:
    from .assets import add_engine_args

    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.local",
        description="Real-time spoken conversation with Moshi through the microphone and speaker.",
    )
    add_engine_args(p)
    g = add_audio_args(p)
    add_record_arg(g)
    g.add_argument(
        "--demo-output", default="moshi-demo.wav", metavar="WAV",
        help="with --demo and no sound devices: where to write Moshi's babble (default moshi-demo.wav)",
    )
    return p


# ------------------------------------------------------------------------------------------------
# The session
# ------------------------------------------------------------------------------------------------


def converse(args: argparse.Namespace) -> int:
    from .assets import load_from_args, settings_from_args
    from .engine import EngineRunner

    # Devices first: a wrong --input-device should not cost a model load.
    runner = None
    recorder = make_recorder(args.record)

    def push(frame):
        if runner is not None:
            if recorder is not None:  # only once the model listens: both sides start together
                recorder.add_user(frame)
            runner.push(frame)

    def played(frame):
        if recorder is not None and runner is not None:
            recorder.add_moshi(frame)

    echo_canceller = None if args.no_aec else _make_echo_canceller(args.aec_delay_ms)
    try:
        audio = DuplexAudio(
            push, args.input_device, args.output_device,
            max_queued=args.max_lag_frames + 3, echo_canceller=echo_canceller, on_output=played,
        )
    except AudioDeviceError as e:
        if args.demo and args.input_device is None and args.output_device is None:
            return _offline_demo(args, e)
        raise
    _log(audio.describe() + (", echo cancellation on" if echo_canceller else ", echo cancellation off"))

    t0 = time.perf_counter()
    assets = load_from_args(args, log=_log)
    engine = assets.engine(settings_from_args(args))
    load_s = time.perf_counter() - t0
    warm_s = engine.warmup()
    _log(f"ready in {load_s + warm_s:.1f} s (load {load_s:.1f} s, warm-up {warm_s:.1f} s): {assets.description}")

    texts: queue.SimpleQueue = queue.SimpleQueue()
    latencies: deque[float] = deque(maxlen=100_000)
    failure: list[BaseException] = []

    def on_result(res) -> None:  # engine's decode thread: hand over, never wait
        audio.play(res.pcm)
        latencies.append(runner.stats.last_latency_ms)
        if res.text:
            texts.put(res.text)

    def show(piece: str) -> None:
        display.text(piece)
        if recorder is not None:
            recorder.add_text(piece)

    runner = EngineRunner(engine, on_result, max_pending=args.max_lag_frames, on_error=failure.append)
    display = _Display()
    started = time.perf_counter()
    warned_drops = 0
    last_warn = 0.0
    interrupted = False
    try:
        runner.start()
        audio.start()
        _log("listening: speak to Moshi (Ctrl-C to quit)")
        while True:
            try:
                show(texts.get(timeout=0.1))
                while True:
                    show(texts.get_nowait())
            except queue.Empty:
                pass
            if failure or runner.error is not None:
                raise failure[0] if failure else runner.error
            if audio.callback_error is not None:
                raise AudioDeviceError(f"audio callback failed: {audio.callback_error}")
            now = time.perf_counter()
            st, ast = runner.stats, audio.stats
            lag_ms = st.last_latency_ms + audio.queued_frames * FRAME_S * 1e3
            display.set_status(lag_status(lag_ms, st.dropped, ast.underruns), now)
            if st.dropped > warned_drops and now - last_warn >= 2.0:
                display.message(
                    f"moshi is behind real time: skipped {st.dropped} of your frames so far "
                    f"({st.dropped * FRAME_S:.1f} s of audio); lag {lag_ms:.0f} ms"
                )
                warned_drops, last_warn = st.dropped, now
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with _sigint_ignored():  # a second Ctrl-C must not break the cleanup
            audio.close()
            runner.stop(timeout=1.0)
            engine.close()
            display.finish()
            if recorder is not None:
                save_recording(recorder, args.record, {"model": assets.description})
    st, ast = runner.stats, audio.stats
    lat = list(latencies)
    lat_txt = f", latency median {statistics.median(lat):.0f} ms / max {max(lat):.0f} ms" if lat else ""
    reduction = echo_canceller.reduction_db if echo_canceller is not None else None
    if reduction is not None:
        _log(f"echo cancellation: {reduction:.1f} dB removed from the mic while Moshi was speaking")
    _log(
        f"session: {time.perf_counter() - started:.1f} s, {st.frames_in} frames in, {st.frames_out} answered, "
        f"{st.dropped} dropped ({st.dropped * FRAME_S:.1f} s), {ast.underruns} underruns{lat_txt}"
        + (" (stopped by Ctrl-C)" if interrupted else "")
    )
    return 0


def _offline_demo(args: argparse.Namespace, device_error: BaseException) -> int:
    """--demo on a machine with no usable sound device: run the same pipeline on a test signal."""
    import numpy as np

    from .assets import load_from_args, settings_from_args
    from .run_inference import converse_offline, write_wav

    _log(f"no usable sound device ({first_line(device_error)})")
    _log(f"running the demo offline instead: 10 s of test signal in, Moshi's babble out to {args.demo_output}")
    assets = load_from_args(args, log=_log)
    engine = assets.engine(settings_from_args(args))
    t = np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    # A gliding tone with a syllable-like envelope stands in for a voice.
    signal_in = 0.3 * np.sin(2 * np.pi * (150 + 50 * np.sin(2 * np.pi * 0.5 * t)) * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    try:
        out, pieces = converse_offline(engine, signal_in.astype(np.float32))
    finally:
        engine.close()
    write_wav(args.demo_output, out)
    print("".join(p["text"] for p in pieces).strip())
    recorder = make_recorder(args.record)
    if recorder is not None:
        recorder.add_user(signal_in)
        recorder.add_moshi(out)
        for p in pieces:
            recorder.add_text(p["text"], p["start"])
        save_recording(recorder, args.record, {"model": assets.description})
    _log(f"demo done: {len(pieces)} transcript pieces, {out.size / SAMPLE_RATE:.1f} s of audio in {args.demo_output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    with sigterm_interrupts():
        if args.list_devices:
            print(list_devices())
            return 0
        return converse(args)


def console_main() -> None:
    """Command-line entry: ``main()``, then a quick exit (see :func:`moshi_mlx.terminal.exit_now`)."""
    exit_now(main())


if __name__ == "__main__":
    console_main()
