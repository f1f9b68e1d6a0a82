"""Offline run: ``python -m moshi_mlx.run_inference in.wav out.wav [--transcript out.json]``.

The input (any sample rate and channel count) is mixed to mono, resampled to 24 kHz, padded to whole
80 ms frames and fed to the same :class:`~moshi_mlx.engine.ConversationEngine` as the live app, one
frame after the other, with no real-time pacing and no frame dropping. Moshi's answer is written as a
24 kHz 16-bit WAV of exactly the input's duration; the transcript (optional) is JSON with the time of
every text piece (frame index * 0.08 s, on the output file's timeline).

WAV files (8/16/24/32-bit integer PCM, 32/64-bit float, WAVE_FORMAT_EXTENSIBLE) are read by a small
RIFF reader here; other formats (FLAC, MP3, Ogg, ...) go through ``sphn.read``, a dependency already.
Sessions of any length work: :class:`~moshi_mlx.mimi.Mimi` hands off before rustymimi's limit.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import wave
from pathlib import Path
from typing import Callable

import numpy as np

from .audio import FRAME_SIZE, SAMPLE_RATE, resample
from .errors import error_line

FRAME_S = FRAME_SIZE / SAMPLE_RATE


class AudioFileError(ValueError):
    """An input or output audio file that cannot be used; the message is one line naming the file."""


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def _read_wav(path: Path, data: bytes) -> tuple[np.ndarray, int]:
    """Parse a RIFF/WAVE file held in ``data``; returns float32 [channels, samples] and the rate."""
    fmt = None
    pos, body = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        start = pos + 8
        if cid == b"fmt ":
            if size < 16:
                raise AudioFileError(f"{path}: broken WAV header (fmt chunk of {size} bytes)")
            tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", data[start : start + 16])
            if tag == _EXTENSIBLE and size >= 40:
                tag = struct.unpack("<H", data[start + 24 : start + 26])[0]  # first bytes of the subformat GUID
            fmt = (tag, channels, rate, align, bits)
        elif cid == b"data":
            # An unfinished recording (header never updated) says 0 or 0xFFFFFFFF, or a size past the
            # end of the file: take what is there.
            body = data[start:] if size in (0, 0xFFFFFFFF) else data[start : start + size]
            break
        pos = start + size + (size & 1)
    if fmt is None or body is None:
        raise AudioFileError(f"{path}: broken WAV file (no {'fmt' if fmt is None else 'data'} chunk)")
    tag, channels, rate, align, bits = fmt
    if channels < 1 or rate < 1:
        raise AudioFileError(f"{path}: broken WAV header ({channels} channels, {rate} Hz)")
    width = bits // 8 if bits % 8 == 0 else align // channels
    if width < 1:
        raise AudioFileError(f"{path}: broken WAV header ({bits} bits per sample)")
    n = len(body) // (width * channels)
    body = body[: n * width * channels]
    if tag == _FLOAT and width in (4, 8):
        x = np.frombuffer(body, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
    elif tag == _PCM and width == 1:
        x = (np.frombuffer(body, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == _PCM and width in (2, 4):
        x = np.frombuffer(body, dtype=f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    elif tag == _PCM and width == 3:
        b = np.frombuffer(body, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        kind = {_PCM: "integer PCM", _FLOAT: "float"}.get(tag, f"format tag {tag:#x}")
        raise AudioFileError(f"{path}: unsupported WAV encoding ({kind}, {bits} bits)")
    return x.reshape(n, channels).T.copy(), rate


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Any WAV (or another format sphn can decode) -> float32 [channels, samples] and the sample rate."""
    path = Path(path)
    if not path.exists():
        raise AudioFileError(f"{path}: no such file")
    if path.is_dir():
        raise AudioFileError(f"{path}: is a directory, expected an audio file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AudioFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not data:
        raise AudioFileError(f"{path}: file is empty")
    if data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE":
        if data[:4] != b"RIFF":
            raise AudioFileError(f"{path}: unsupported WAV variant ({data[:4].decode()})")
        x, rate = _read_wav(path, data)
    else:
        try:
            import sphn

            x, rate = sphn.read(str(path))
        except Exception:
            raise AudioFileError(f"{path}: not an audio file this tool can read (WAV, FLAC, MP3, Ogg)") from None
        x = np.asarray(x, dtype=np.float32)
        x = x[None, :] if x.ndim == 1 else x
    if x.shape[-1] == 0:
        raise AudioFileError(f"{path}: contains no audio samples")
    if not np.isfinite(x).all():
        raise AudioFileError(f"{path}: contains NaN or infinite samples")
    return x, int(rate)


def load_mono_24k(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """The file as 24 kHz mono float32, and its duration in seconds."""
    x, rate = read_audio(path)
    mono = x.mean(axis=0) if x.shape[0] > 1 else x[0]
    return resample(mono, rate, SAMPLE_RATE), x.shape[-1] / rate


def write_wav(path: str | os.PathLike, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Mono 16-bit PCM WAV (samples clipped to [-1, 1])."""
    pcm16 = (np.clip(np.asarray(pcm, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    try:
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm16.tobytes())
    except OSError as e:
        raise AudioFileError(f"{path}: cannot be written ({e.strerror or e})") from None


# ------------------------------------------------------------------------------------------------
# Running the engine
# ------------------------------------------------------------------------------------------------


def converse_offline(
    engine, pcm: np.ndarray, progress: Callable[[int, int], None] | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Feed 24 kHz mono ``pcm`` to the engine frame by frame from a fresh conversation.

    Returns Moshi's audio (same length as ``pcm``) and the transcript pieces
    ``{"frame", "start", "text"}``, where ``start`` is the piece's time in the returned audio.
    """
    pcm = np.asarray(pcm, np.float32).reshape(-1)
    n_frames = -(-pcm.size // FRAME_SIZE)
    padded = np.zeros(n_frames * FRAME_SIZE, np.float32)
    padded[: pcm.size] = pcm
    out = np.zeros_like(padded)
    pieces: list[dict] = []
    engine.reset()
    for i in range(n_frames):
        res = engine.process(padded[i * FRAME_SIZE : (i + 1) * FRAME_SIZE])
        out[i * FRAME_SIZE : (i + 1) * FRAME_SIZE] = res.pcm
        if res.text:
            pieces.append({"frame": i, "start": round(i * FRAME_S, 3), "text": res.text})
        if progress is not None:
            progress(i + 1, n_frames)
    return out[: pcm.size], pieces


class _Progress:
    """A progress bar on stderr (a line every 10% when stderr is not a terminal)."""

    def __init__(self, label: str = "moshi") -> None:
        self.tty = sys.stderr.isatty()
        self.label = label
        self.start = time.perf_counter()
        self._last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        speed = done * FRAME_S / elapsed if elapsed > 0 else 0.0
        frac = done / total if total else 1.0
        if self.tty:
            bar = "#" * int(frac * 30)
            eta = (total - done) * elapsed / done if done else 0.0
            sys.stderr.write(
                f"\r{self.label} [{bar:<30}] {done}/{total} frames {frac:4.0%} {speed:.2f}x real time, eta {eta:.0f} s\033[K"
            )
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            msg = f"{self.label}: {done}/{total} frames ({frac:.0%}), {speed:.2f}x real time"
            print(msg, file=sys.stderr, flush=True)


def convert_file(
    engine,
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    transcript_path: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    loaded: tuple[np.ndarray, float] | None = None,
) -> dict:
    """Read ``in_path`` (unless ``loaded`` holds its ``load_mono_24k``), run the conversation, write
    ``out_path`` and the transcript JSON. Returns the transcript."""
    pcm, duration = loaded if loaded is not None else load_mono_24k(in_path)
    start = time.perf_counter()
    out, pieces = converse_offline(engine, pcm, progress)
    seconds = time.perf_counter() - start
    write_wav(out_path, out)
    transcript = {
        "input": str(in_path),
        "output": str(out_path),
        "sample_rate": SAMPLE_RATE,
        "frame_seconds": FRAME_S,
        "duration": round(out.size / SAMPLE_RATE, 6),
        "input_duration": round(duration, 6),
        "frames": -(-out.size // FRAME_SIZE),
        "processing_seconds": round(seconds, 3),
        "pieces": pieces,
        "text": "".join(p["text"] for p in pieces).strip(),
    }
    if transcript_path is not None:
        try:
            Path(transcript_path).write_text(json.dumps(transcript, indent=1, ensure_ascii=False) + "\n")
        except OSError as e:
            raise AudioFileError(f"{transcript_path}: cannot be written ({e.strerror or e})") from None
    return transcript


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .assets import add_engine_args

    p = argparse.ArgumentParser(
        prog="python -m moshi_mlx.run_inference",
        description="Let Moshi answer a recorded audio file: file in, Moshi's audio (and transcript) out.",
    )
    p.add_argument("input", help="audio file (WAV at any rate/channels; FLAC, MP3, Ogg also work)")
    p.add_argument("output", help="where to write Moshi's audio (24 kHz mono 16-bit WAV)")
    p.add_argument("--transcript", metavar="JSON", default=None, help="write Moshi's text pieces with timestamps")
    add_engine_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .assets import load_from_args, settings_from_args

        # Check the input before paying for a model load.
        loaded = load_mono_24k(args.input)
        out_dir = Path(args.output).resolve().parent
        if not out_dir.is_dir():
            raise AudioFileError(f"{args.output}: directory {out_dir} does not exist")
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        assets = load_from_args(args, log=log)
        log(f"loaded in {assets.load_seconds:.1f} s: {assets.description}")
        engine = assets.engine(settings_from_args(args))
        try:
            t = convert_file(engine, args.input, args.output, args.transcript, _Progress(), loaded)
        finally:
            engine.close()
        speed = t["duration"] / t["processing_seconds"] if t["processing_seconds"] else 0.0
        log(
            f"wrote {args.output} ({t['duration']:.2f} s, {t['frames']} frames, {speed:.2f}x real time)"
            + (f" and {args.transcript} ({len(t['pieces'])} pieces)" if args.transcript else "")
        )
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("MOSHI_MLX_DEBUG"):
            raise
        print(error_line(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
