"""Talk to Moshi in the terminal: ``python -m moshi_mlx.local -q 4`` (``--demo`` runs with no download).

Thin over the library: :mod:`moshi_mlx.model_files.assets` loads the model, :class:`moshi_mlx.engine.EngineRunner`
runs it on worker threads, :class:`moshi_mlx.cli.terminal.TerminalSession` moves 80 ms frames between the
sound devices and the runner and shows Moshi's words as they come (stdout) and how far behind real time
the model is (stderr). This module only wires them together: start-up time, and the offline ``--demo``.
A speech-to-text model (``--hf-repo kyutai/stt-1b-en_fr-mlx``) gives live captions of the microphone instead
(:mod:`moshi_mlx.cli.live_captions`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from .audio.device_choice import AudioDeviceError
from .audio.files import write_wav
from .audio.frames import SAMPLE_RATE
from .cli.terminal import (
    LocalMoshi,
    TerminalSession,
    add_audio_args,
    add_record_arg,
    entry_points,
    make_recorder,
    save_recording,
)
from .cli.terminal import log as _log
from .errors import UsageError, first_line
from .model_files.assets import STT_DEMO
from .outputs import OutputError, atomic_output, check_outputs, fresh_path

#: Said when there is no sound card: the two ways to try Moshi without one.
NO_SOUND_HINT = (
    "without a sound card, try `python -m moshi_mlx.local --demo` or answer a recording with "
    "`python -m moshi_mlx.run_inference in.wav out.wav`"
)


def build_parser() -> argparse.ArgumentParser:
    from .cli.flags import add_engine_args, add_stt_demo_arg, add_transcribe_user_arg
    from .transcribe import heads_note

    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.local",
        description="Real-time spoken conversation with Moshi through the microphone and speaker.",
        epilog="A speech-to-text model (--hf-repo kyutai/stt-1b-en_fr-mlx) gives live captions of the microphone "
        "instead (no speaker opened): each word on stdout as 'start end word' (seconds from the start), an "
        "end-of-turn meter on the status line (--demo-stt shows it with a random stand-in); --record DIR keeps the microphone and the timed transcript (JSON: "
        f"words, VAD probabilities, ends of turn). The meter: {heads_note()}.",
    )
    add_engine_args(p, persona=True)
    add_stt_demo_arg(p)
    add_transcribe_user_arg(p)
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
    from .cli.flags import (
        check_persona_args, load_from_args, load_user_stt, resolve_from_args, resolve_user_stt, settings_from_args,
    )

    _check_demo_output(args)
    check_persona_args(args)
    # Model files first (a missing or undownloadable file is the real problem, not the sound card), then the
    # devices: a wrong --input-device should not cost a model load.
    resolved = resolve_from_args(args)
    if args.demo == STT_DEMO or (resolved is not None and resolved.config.text_only):  # captions, no speaker
        from .cli.live_captions import caption

        if args.transcribe_user is not None:
            raise UsageError("--transcribe-user: this model is a speech-to-text model; it already writes your words down")
        return caption(args, resolved)
    want_stt, stt_resolved = resolve_user_stt(args)
    can_demo = args.demo and args.input_device is None and args.output_device is None
    moshi = LocalMoshi()
    try:
        session = TerminalSession(args, moshi, no_sound_hint=None if can_demo else NO_SOUND_HINT)
    except AudioDeviceError as e:
        if can_demo:
            return _offline_demo(args, e, stt_resolved if want_stt else False)
        raise

    t0 = time.perf_counter()
    stt = load_user_stt(args, stt_resolved, log=_log) if want_stt else None
    assets = load_from_args(args, log=_log, resolved=resolved, stt=stt)
    engine = assets.engine(settings_from_args(args, assets.lm.config))
    if stt is not None:
        session.attach_user_transcriber(stt)
    load_s = time.perf_counter() - t0
    warm_s = engine.warmup()
    _log(f"ready in {load_s + warm_s:.1f} s (load {load_s:.1f} s, warm-up {warm_s:.1f} s): {assets.description}")
    moshi.start(engine, assets.description, session, max_pending=args.max_lag_frames)
    session.begin()
    return session.run(lambda: moshi.converse(session), summary_on_error=False)


def _check_demo_output(args: argparse.Namespace) -> None:
    """An explicit --demo-output is checked before anything runs: it must be new (the demo never replaces a file)."""
    if args.demo_output is None:
        return
    if not args.demo:
        raise UsageError("--demo-output only applies with --demo")
    if args.demo == STT_DEMO:
        raise UsageError("--demo-output: the speech-to-text demo writes no audio (its captions go to stdout; "
                         "--record DIR keeps them)")
    if os.path.lexists(args.demo_output):
        raise OutputError(
            f"--demo-output {args.demo_output}: exists; the demo never replaces a file (remove it or pick a new name)"
        )
    check_outputs(inputs=[], outputs=[args.demo_output])


def _write_demo_wav(pcm, chosen: str | None) -> Path:
    """Write the demo's audio to a new file: `chosen`, or a fresh dated name here; returns where it went."""
    while True:
        path = Path(chosen) if chosen is not None else fresh_path(".", "moshi-demo", ".wav")
        try:
            with atomic_output(path, suffix=".wav", overwrite=False) as tmp:
                write_wav(tmp, pcm)
            return path
        except FileExistsError:  # appeared while the demo ran
            if chosen is not None:
                raise OutputError(f"--demo-output {chosen}: was created meanwhile; the demo never replaces a file") from None


def _offline_demo(args: argparse.Namespace, device_error: BaseException, stt_resolved: object = False) -> int:
    """--demo on a machine with no usable sound device: run the same pipeline on a test signal.
    `stt_resolved`: --transcribe-user's model as resolve_user_stt found it (False: not asked for)."""
    from .cli.flags import load_from_args, load_user_stt, settings_from_args
    from .clips import DEMO_SIGNAL_SECONDS, converse_offline, demo_signal

    _log(f"no usable sound device ({first_line(device_error)})")
    where = args.demo_output or "a new moshi-demo-*.wav in the current folder"
    if args.demo_output is None:  # the folder must take a file before 10 s of work, not after
        check_outputs(inputs=[], outputs=[fresh_path(".", "moshi-demo", ".wav")])
    _log(f"running the demo offline instead: {DEMO_SIGNAL_SECONDS:.0f} s of test signal in, Moshi's babble out to "
         f"{where}")
    stt = load_user_stt(args, stt_resolved, log=_log) if stt_resolved is not False else None
    assets = load_from_args(args, log=_log, stt=stt)
    engine = assets.engine(settings_from_args(args, assets.lm.config))
    signal_in = demo_signal()
    shown: list[str] = []

    def show(piece: dict) -> None:  # the transcript as it comes: the 125 frames take tens of seconds on a CPU
        text = piece["text"] if shown else piece["text"].lstrip()
        shown.append(text)
        print(text, end="", flush=True)

    try:
        out, pieces = converse_offline(engine, signal_in, on_text=show)
    finally:
        engine.close()
    print(flush=True)
    words = _user_words_offline(stt, signal_in.astype(np.float32)) if stt is not None else []
    if words:
        print(f"[{words[0].start:7.1f} s] you: " + " ".join(w.text for w in words), flush=True)
    written = _write_demo_wav(out, args.demo_output)
    recorder = make_recorder(args.record)
    if recorder is not None:
        recorder.add_user(signal_in)
        recorder.add_moshi(out)
        for p in pieces:
            recorder.add_text(p["text"], p["start"])
        for w in words:
            recorder.add_text(" " + w.text, w.start, speaker="you", end=w.end)
        save_recording(recorder, {"model": assets.description})
    _log(f"demo done: {len(pieces)} transcript pieces, {out.size / SAMPLE_RATE:.1f} s of audio written to {written}")
    return 0


def _user_words_offline(stt, pcm: np.ndarray) -> list:
    """--transcribe-user in the offline demo: the test signal's words from the STT model (the same worker-thread
    transcriber as live, fed at once and flushed)."""
    from .audio.frames import FRAME_SIZE
    from .user_transcript import UserTranscriber

    words: list = []
    user = UserTranscriber(stt.lm, stt.mimi, stt.tokenizer, words.extend)
    for i in range(0, pcm.size - FRAME_SIZE + 1, FRAME_SIZE):
        while user.waiting > 10:  # offline: nothing to drop, so wait for the model
            time.sleep(0.01)
        user.push(pcm[i:i + FRAME_SIZE])
    user.close(flush=True, timeout=60.0)
    stt.close()
    return words


#: ``main(argv) -> exit code``; ``console_main()``: the command line's entry (``main()``, then a quick exit).
main, console_main = entry_points(build_parser, converse, NO_SOUND_HINT)

if __name__ == "__main__":
    console_main()
