"""Talk to Moshi in the terminal: ``python -m moshi_mlx.local -q 4`` (``--demo`` runs with no download).

Thin over the library: :mod:`moshi_mlx.model_files.assets` loads the model, :class:`moshi_mlx.engine.EngineRunner`
runs it on worker threads, :class:`moshi_mlx.audio.devices.DuplexAudio` moves 80 ms frames between the
sound devices and the runner. This module only wires them together and talks to the user:
start-up time, Moshi's words as they come (stdout), and how far behind real time the model is (stderr).
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import time
from collections import deque
from pathlib import Path

from .audio.devices import AudioDeviceError, DuplexAudio, NoDefaultDevice
from .audio.frames import FRAME_S, SAMPLE_RATE
from .cli import sigint_ignored, stopped_by
from .cli.terminal import Display as _Display
from .cli.terminal import (
    add_audio_args,
    add_record_arg,
    echo_summary,
    exit_now,
    lag_status,
    make_recorder,
    run_app,
    save_recording,
)
from .cli.terminal import log as _log
from .cli.terminal import make_echo_canceller as _make_echo_canceller
from .errors import UsageError, first_line
from .outputs import OutputError, atomic_output, check_outputs, fresh_path

#: Said when there is no sound card: the two ways to try Moshi without one.
NO_SOUND_HINT = (
    "without a sound card, try `python -m moshi_mlx.local --demo` or answer a recording with "
    "`python -m moshi_mlx.run_inference in.wav out.wav`"
)


def build_parser() -> argparse.ArgumentParser:
    from .cli.flags import add_engine_args

    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.local",
        description="Real-time spoken conversation with Moshi through the microphone and speaker.",
    )
    add_engine_args(p)
    g = add_audio_args(p)
    add_record_arg(g)
    g.add_argument(
        "--demo-output", default=None, metavar="WAV",
        help="with --demo and no sound devices: where to write Moshi's babble; never replaces a file "
        "(default: a new moshi-demo-YYYYmmdd-HHMMSS.wav in the current folder)",
    )
    return p


# ------------------------------------------------------------------------------------------------
# The session
# ------------------------------------------------------------------------------------------------


def converse(args: argparse.Namespace) -> int:
    from .cli.flags import load_from_args, settings_from_args
    from .engine import EngineRunner

    _check_demo_output(args)
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
        if isinstance(e, NoDefaultDevice):
            raise NoDefaultDevice(e.kind, f"{e}; or, {NO_SOUND_HINT}") from None
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
    interrupted: str | None = None  # what stopped the session: "Ctrl-C" or "SIGTERM"
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
    except KeyboardInterrupt as e:
        interrupted = stopped_by(e)
    finally:
        with sigint_ignored():  # a second Ctrl-C must not break the cleanup
            audio.close()
            runner.stop(timeout=1.0)
            engine.close()
            display.finish()
            if recorder is not None:
                save_recording(recorder, args.record, {"model": assets.description})
    st, ast = runner.stats, audio.stats
    lat = list(latencies)
    lat_txt = f", latency median {statistics.median(lat):.0f} ms / max {max(lat):.0f} ms" if lat else ""
    echo_line = echo_summary(echo_canceller)
    if echo_line is not None:
        _log(echo_line)
    _log(
        f"session: {time.perf_counter() - started:.1f} s, {st.frames_in} frames in, {st.frames_out} answered, "
        f"{st.dropped} dropped ({st.dropped * FRAME_S:.1f} s), {ast.underruns} underruns{lat_txt}"
        + (f" (stopped by {interrupted})" if interrupted else "")
    )
    return 0


def _check_demo_output(args: argparse.Namespace) -> None:
    """An explicit --demo-output is checked before anything runs: it must be new (the demo never replaces a file)."""
    if args.demo_output is None:
        return
    if not args.demo:
        raise UsageError("--demo-output only applies with --demo")
    if os.path.lexists(args.demo_output):
        raise OutputError(
            f"--demo-output {args.demo_output}: exists; the demo never replaces a file (remove it or pick a new name)"
        )
    check_outputs(inputs=[], outputs=[args.demo_output])


def _write_demo_wav(pcm, chosen: str | None) -> Path:
    """Write the demo's audio to a new file: `chosen`, or a fresh dated name here; returns where it went."""
    from .run_inference import write_wav

    while True:
        path = Path(chosen) if chosen is not None else fresh_path(".", "moshi-demo", ".wav")
        try:
            with atomic_output(path, suffix=".wav", overwrite=False) as tmp:
                write_wav(tmp, pcm)
            return path
        except FileExistsError:  # appeared while the demo ran
            if chosen is not None:
                raise OutputError(f"--demo-output {chosen}: was created meanwhile; the demo never replaces a file") from None


def _offline_demo(args: argparse.Namespace, device_error: BaseException) -> int:
    """--demo on a machine with no usable sound device: run the same pipeline on a test signal."""
    import numpy as np

    from .cli.flags import load_from_args, settings_from_args
    from .run_inference import converse_offline

    _log(f"no usable sound device ({first_line(device_error)})")
    where = args.demo_output or "a new moshi-demo-*.wav in the current folder"
    if args.demo_output is None:  # the folder must take a file before 10 s of work, not after
        check_outputs(inputs=[], outputs=[fresh_path(".", "moshi-demo", ".wav")])
    _log(f"running the demo offline instead: 10 s of test signal in, Moshi's babble out to {where}")
    assets = load_from_args(args, log=_log)
    engine = assets.engine(settings_from_args(args))
    t = np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    # A gliding tone with a syllable-like envelope stands in for a voice.
    signal_in = 0.3 * np.sin(2 * np.pi * (150 + 50 * np.sin(2 * np.pi * 0.5 * t)) * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    try:
        out, pieces = converse_offline(engine, signal_in.astype(np.float32))
    finally:
        engine.close()
    written = _write_demo_wav(out, args.demo_output)
    print("".join(p["text"] for p in pieces).strip())
    recorder = make_recorder(args.record)
    if recorder is not None:
        recorder.add_user(signal_in)
        recorder.add_moshi(out)
        for p in pieces:
            recorder.add_text(p["text"], p["start"])
        save_recording(recorder, args.record, {"model": assets.description})
    _log(f"demo done: {len(pieces)} transcript pieces, {out.size / SAMPLE_RATE:.1f} s of audio written to {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_app(build_parser(), converse, NO_SOUND_HINT, argv)


def console_main() -> None:
    """Command-line entry: ``main()``, then a quick exit (see :func:`moshi_mlx.cli.terminal.exit_now`)."""
    exit_now(main())


if __name__ == "__main__":
    console_main()
