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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from . import cli
from .audio.files import AudioReader, WavWriter, output_format
from .audio.frames import FRAME_S, FRAME_SIZE, SAMPLE_RATE
from .clips import converse_stream
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
    p.add_argument("output", help="where to write Moshi's audio (24 kHz mono 16-bit; .wav, .flac or .aiff by its name)")
    p.add_argument(
        "--transcript", metavar="JSON", default=None,
        help="write Moshi's text pieces with timestamps as JSON (default: print the text to stdout)",
    )
    add_engine_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), _main, argv, interrupted="interrupted: no output written")


def _main(args: argparse.Namespace) -> int:
    # `kill` cleans up like Ctrl-C: temporary files go, outputs stay as they were
    with cli.sigterm_interrupts():
        return _answer(args)


def _answer(args: argparse.Namespace) -> int:
    from .cli.flags import load_from_args, settings_from_args

    # Open the input and check the outputs before paying for a model load.
    AudioReader(args.input).close()
    output_format(args.output)
    check_outputs(inputs=[args.input], outputs=[args.output, args.transcript])
    assets = load_from_args(args)
    cli.say(f"loaded in {assets.load_seconds:.1f} s: {assets.description}")
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


if __name__ == "__main__":
    sys.exit(main())
