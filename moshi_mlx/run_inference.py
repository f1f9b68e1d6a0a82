"""Offline run: ``python -m moshi_mlx.run_inference in.wav out.wav [--transcript out.json]``.

The input (any format libsndfile reads, any sample rate and channel count) is read in blocks, mixed
to mono, resampled to 24 kHz as a stream, cut into 80 ms frames (the last one padded) and fed to the
same :class:`~moshi_mlx.engine.ConversationEngine` as the live app, with no real-time pacing and no
frame dropping. Moshi's answer is written block by block as a 24 kHz 16-bit WAV of exactly the
input's duration, so memory does not grow with the file's length. The transcript is JSON with the
time of every text piece (frame index * 0.08 s, on the output file's timeline), or, without
``--transcript``, its text on stdout.

Outputs are checked before the model loads (never the input, never each other, folders writable)
and written to temporary files renamed into place at the end (:mod:`moshi_mlx.outputs`): an
interrupted run leaves no partial file and never damages an existing one.
Sessions of any length work: :class:`~moshi_mlx.audio.mimi.Mimi` hands off before rustymimi's limit.

A speech-to-text model (Kyutai's STT: text only) takes no OUTPUT: ``run_inference in.wav --hf-repo
kyutai/stt-1b-en_fr-mlx`` prints the timed words as they come (``start end word``, seconds in the input), or
writes them into ``--transcript t.json`` / ``.txt`` / ``.srt`` (:mod:`moshi_mlx.transcribe`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Callable

from . import cli
from .audio.files import AudioReader, WavWriter, output_format
from .audio.frames import FRAME_S, FRAME_SIZE, SAMPLE_RATE
from .captions import format_of, render, word_line
from .clips import converse_stream
from .errors import MoshiError
from .outputs import atomic_output, check_outputs

__all__ = ["convert_file", "main"]

# ------------------------------------------------------------------------------------------------
# Running the engine
# ------------------------------------------------------------------------------------------------


def convert_file(
    engine,
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    transcript_path: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Stream ``in_path`` through a conversation into ``out_path`` (and the transcript JSON, if a path
    is given); both appear only when complete. Returns the transcript."""
    out_format = output_format(out_path)  # by the name the user gave: out.flac is FLAC
    out_real, *rest = check_outputs(inputs=[in_path], outputs=[out_path, transcript_path])
    transcript_real = rest[0] if rest else None
    with AudioReader(in_path) as reader, atomic_output(out_real) as tmp_out:
        start = time.perf_counter()
        total = -(-reader.frames_24k // FRAME_SIZE)  # an estimate for some compressed formats
        report = None if progress is None else (lambda done: progress(done, max(total, done)))
        with WavWriter(tmp_out, format=out_format, shown=out_path) as writer:
            pieces = converse_stream(engine, reader.blocks_24k(), writer.write, report)
        samples = writer.samples
        if progress is not None and samples:
            progress(-(-samples // FRAME_SIZE), -(-samples // FRAME_SIZE))  # 100 %, even if the estimate was off
        transcript = {
            "input": str(in_path),
            "output": str(out_path),
            "sample_rate": SAMPLE_RATE,
            "frame_seconds": FRAME_S,
            "duration": round(samples / SAMPLE_RATE, 6),
            "input_duration": round(reader.duration, 6),
            "frames": -(-samples // FRAME_SIZE),
            "processing_seconds": round(time.perf_counter() - start, 3),
            "pieces": pieces,
            "text": "".join(p["text"] for p in pieces).strip(),
        }
        if transcript_real is not None:
            with atomic_output(transcript_real) as tmp_t:
                tmp_t.write_text(json.dumps(transcript, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return transcript


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .cli.flags import add_engine_args

    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.run_inference",
        description="Let Moshi answer a recorded audio file: file in, Moshi's audio (and transcript) out.",
    )
    p.add_argument("input", help="audio file (WAV, FLAC, MP3, Ogg, AIFF; any rate and channel count)")
    p.add_argument("output", nargs="?", default=None,
                   help="where to write Moshi's audio (24 kHz mono 16-bit; .wav, .flac or .aiff by its name); "
                   "none for a speech-to-text model")
    p.add_argument(
        "--transcript", metavar="PATH", default=None,
        help="write Moshi's text pieces with timestamps as JSON (default: print the text to stdout); with a "
        "speech-to-text model (kyutai/stt-*) the timed words as .json, .txt or .srt (default: word lines on stdout)",
    )
    add_engine_args(p, persona=True)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv, interrupted="interrupted: no output written")


def _main(args: argparse.Namespace) -> int:
    # `kill` cleans up like Ctrl-C: temporary files go, outputs stay as they were
    with cli.sigterm_interrupts():
        return _answer(args)


def _answer(args: argparse.Namespace) -> int:
    from .cli.flags import check_persona_args, load_from_args, settings_from_args

    # Open the input and check the outputs before paying for a model load.
    AudioReader(args.input).close()
    check_persona_args(args)
    if args.output is not None:
        output_format(args.output)
    check_outputs(inputs=[args.input], outputs=[args.output, args.transcript])
    if args.output is None and args.transcript is not None:
        format_of(args.transcript)  # a transcript alone: a speech-to-text run, whose formats go by suffix
    assets = load_from_args(args)
    cli.say(f"loaded in {assets.load_seconds:.1f} s: {assets.description}")
    if assets.lm.config.text_only != (args.output is None):
        raise MoshiError("a speech-to-text model writes no audio: drop OUTPUT" if args.output else
                         "OUTPUT is needed: Moshi answers with audio (only a speech-to-text model needs none)")
    if assets.lm.config.text_only:
        return _transcribe(args, assets)
    engine = assets.engine(settings_from_args(args, assets.lm.config))
    try:
        t = convert_file(engine, args.input, args.output, args.transcript, cli.Progress(interval_s=30).callback("moshi", unit="frame"))
    finally:
        engine.close()
    cli.say(
        f"wrote {args.output} ({t['duration']:.2f} s, {t['frames']} frames, "
        f"{cli.pace(t['duration'], t['processing_seconds'])})"
        + (f" and {args.transcript} ({len(t['pieces'])} pieces)" if args.transcript else "")
    )
    if args.transcript is None:
        print(t["text"], flush=True)
    return 0


def _transcribe(args: argparse.Namespace, assets) -> int:
    """A speech-to-text model: the input's timed words, on stdout as they come or into --transcript."""
    from .cli.flags import note_text_only_flags
    from .generate import LmGen
    from .settings import GREEDY
    from .transcribe import Transcriber, frames_of

    note_text_only_flags(args)
    plan = assets.memory
    # Greedy text, as Kyutai's STT configs (lm_gen_config temp_text 0) and scripts run these models.
    gen = LmGen(assets.lm, GREEDY, GREEDY, kv_bits=plan.kv_bits if plan else 16, context=plan.context if plan else None,
                extra_heads=True)
    transcriber = Transcriber(gen, assets.mimi, assets.tokenizer)
    start = time.perf_counter()
    words = []

    def emit(new: list) -> None:
        words.extend(new)
        if args.transcript is None:
            for word in new:
                print(word_line(word), flush=True)

    with AudioReader(args.input) as reader:
        for frame in frames_of(reader.blocks_24k()):
            emit(transcriber.feed(frame))
        duration = reader.duration
        emit(transcriber.finish(duration))
    seconds = time.perf_counter() - start
    if args.transcript is not None:
        fmt = format_of(args.transcript)
        meta = {"input": str(args.input), "duration": round(duration, 6), "stt_config": asdict(gen.config.stt),
                "processing_seconds": round(seconds, 3)}
        if gen.extra_heads:  # the semantic VAD: when an end of turn was detected (input seconds)
            meta["end_of_turn_detected_at"] = [round(t, 3) for t in transcriber.turn_ends]
        with atomic_output(check_outputs(inputs=[args.input], outputs=[args.transcript])[0]) as tmp:
            tmp.write_text(render(words, fmt, meta), encoding="utf-8")
    cli.say(f"transcribed {duration:.2f} s in {seconds:.1f} s: {len(words)} words"
            + (f" into {args.transcript}" if args.transcript else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
