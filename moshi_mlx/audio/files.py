"""Audio files in bounded memory: read in blocks, resample as a stream, write as a stream.

* :class:`AudioReader` opens any file libsndfile decodes (WAV of every common encoding, FLAC,
  MP3, Ogg Vorbis/Opus, AIFF, ...) and yields mono 24 kHz float32 blocks (:meth:`AudioReader.blocks_24k`)
  through a ``soxr`` streaming resampler; memory does not depend on the file's length.
* :func:`read_audio` reads a whole (short) file, for tools and tests.
* :class:`WavWriter` writes 24 kHz mono 16-bit WAV block by block.

Errors are one-line :class:`AudioFileError` messages that start with the file's name.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import soundfile as sf

from ..errors import MoshiError, first_line
from .frames import SAMPLE_RATE, Resampler

BLOCK = 1 << 15  # input samples per read: ~0.7 s at 48 kHz, a few hundred KiB at most
#: Sample rates read (Hz): below, a tiny file would resample into gigabytes (a 2 KB file "at 1 Hz" is 100 MB at 24 kHz).
MIN_RATE, MAX_RATE = 4000, 768_000


class AudioFileError(MoshiError, ValueError):
    """An input or output audio file that cannot be used; the message is one line naming the file."""


# libsndfile subtypes for a RIFF header's (format tag, bits), used when its data size is unset.
_RAW_SUBTYPES = {(1, 8): "PCM_U8", (1, 16): "PCM_16", (1, 24): "PCM_24", (1, 32): "PCM_32", (3, 32): "FLOAT", (3, 64): "DOUBLE"}


#: Output formats by file extension (libsndfile writes them all as a stream, 16-bit); no extension: WAV.
OUTPUT_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".aiff": "AIFF", ".aif": "AIFF", "": "WAV"}
#: An unset RIFF data size: a recorder that never finished its header, or one writing to a pipe.
_UNSET_SIZES = (0, 0xFFFFFFFF)


def output_format(path: str | os.PathLike) -> str:
    """libsndfile's format for an output file, by its extension; an extension it would misname is refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        known = ", ".join(s for s in OUTPUT_FORMATS if s)
        raise AudioFileError(f"{path}: cannot write {suffix} files; name the output {known}")
    return OUTPUT_FORMATS[suffix]


def _not_readable(p: Path, head: bytes) -> AudioFileError:
    """The line for a file libsndfile cannot open: an MP4/M4A (Voice Memos, AAC) gets the command that converts it."""
    if head[4:8] == b"ftyp":
        wav = p.with_suffix(".wav").name
        return AudioFileError(
            f"{p}: an MP4/M4A (AAC) file, which this tool cannot decode; convert it to WAV first: "
            f"`afconvert -f WAVE -d LEI16 {p.name} {wav}` (macOS) or `ffmpeg -i {p.name} {wav}`"
        )
    return AudioFileError(f"{p}: not an audio file this tool can read (WAV, FLAC, MP3, Ogg, AIFF)")


def _truncated_wav(f: BinaryIO) -> tuple[int, int] | None:
    """(bytes the data chunk promises, bytes the file holds) for a WAV cut short; ``None`` otherwise."""
    found = _wav_data(f)
    if found is None or found[1] in _UNSET_SIZES:
        return None
    _, size, offset = found
    have = f.seek(0, os.SEEK_END) - offset
    return (size, have) if have < size else None


def _unsized_wav(f: BinaryIO) -> tuple[int, int, str, int] | None:
    """For a WAV whose data chunk says 0 bytes but has data after it (a recorder that never updated
    its header): (rate, channels, subtype, data offset). ``None`` for every other file."""
    found = _wav_data(f)
    if found is None:
        return None
    fmt, size, offset = found
    has_data = f.read(1) != b""
    if size != 0 or not has_data or fmt is None or (fmt[0], fmt[3]) not in _RAW_SUBTYPES:
        return None
    return fmt[2], fmt[1], _RAW_SUBTYPES[(fmt[0], fmt[3])], offset


def _wav_data(f: BinaryIO) -> tuple[tuple[int, int, int, int] | None, int, int] | None:
    """A RIFF/WAVE file's format (tag, channels, rate, bits; None if no fmt chunk came first), its data chunk's
    declared size and the data's offset; ``None`` for every other file."""
    head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    fmt = None
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"fmt ":
            body = f.read(min(size, 64))  # what the fields need: a header's size claim is never allocated
            if len(body) < 16:
                return None
            f.seek(size + (size & 1) - len(body), os.SEEK_CUR)
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the GUID
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            return fmt, size, f.tell()
        else:
            f.seek(size + (size & 1), os.SEEK_CUR)


class _Window:
    """The tail of a file from ``offset`` on, seen as a whole file (libsndfile reads RAW data from 0)."""

    def __init__(self, f: BinaryIO, offset: int) -> None:
        self.f, self.offset = f, offset
        f.seek(offset)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos += self.offset
        return self.f.seek(pos, whence) - self.offset

    def tell(self) -> int:
        return self.f.tell() - self.offset

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)


class AudioReader:
    """An open audio file read block by block. Use as a context manager.

    ``rate``, ``channels`` and ``frames`` (samples per channel; an estimate for some compressed
    formats) are known after opening, before anything is decoded.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        p = self.path
        if not p.exists():
            raise AudioFileError(f"{p}: no such file")
        if p.is_dir():
            raise AudioFileError(f"{p}: is a directory, expected an audio file")
        try:
            self._raw: BinaryIO = open(p, "rb")
        except OSError as e:
            raise AudioFileError(f"{p}: cannot be read ({e.strerror or e})") from None
        try:
            self._file = self._open()
        except BaseException:
            self._raw.close()
            raise
        self.rate: int = int(self._file.samplerate)
        self.channels: int = int(self._file.channels)
        self.frames: int = max(int(self._file.frames), 0)
        if self.rate < 1 or self.channels < 1:
            self.close()
            raise AudioFileError(f"{p}: broken header ({self.channels} channels, {self.rate} Hz)")
        if not MIN_RATE <= self.rate <= MAX_RATE:
            self.close()
            raise AudioFileError(
                f"{p}: sample rate {self.rate} Hz is outside what this tool reads ({MIN_RATE} to {MAX_RATE} Hz)"
            )

    def _open(self) -> sf.SoundFile:
        p = self.path
        if os.fstat(self._raw.fileno()).st_size == 0:
            raise AudioFileError(f"{p}: file is empty")
        truncated = _truncated_wav(self._raw)
        if truncated is not None:  # libsndfile would read what is there and say nothing
            raise AudioFileError(
                f"{p}: truncated WAV: its header promises {truncated[0]} bytes of audio, the file holds "
                f"{truncated[1]} (an interrupted copy or recording?)"
            )
        self._raw.seek(0)
        unsized = _unsized_wav(self._raw)
        self._raw.seek(0)
        try:
            if unsized is not None:
                rate, channels, subtype, offset = unsized
                return sf.SoundFile(_Window(self._raw, offset), samplerate=rate, channels=channels, subtype=subtype, format="RAW")
            return sf.SoundFile(self._raw)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OverflowError) as e:  # Overflow: rate > 2**31
            self._raw.seek(0)
            head = self._raw.read(12)
            if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
                reason = first_line(e).split(": ", 1)[-1]  # libsndfile's "Error opening <obj>: ..." prefix
                raise AudioFileError(f"{p}: unsupported or broken WAV file ({reason})") from None
            raise _not_readable(p, head) from None

    @property
    def duration(self) -> float:
        return self.frames / self.rate

    @property
    def frames_24k(self) -> int:
        """The length at 24 kHz that a file of ``frames`` samples gets."""
        return round(self.frames * SAMPLE_RATE / self.rate)

    def blocks(self, size: int = BLOCK) -> Iterator[np.ndarray]:
        """float32 [samples, channels] blocks from the start; checks every sample is finite."""
        self.frames_read = 0
        while True:
            try:  # a broken stream can fail at the seek to its start as well as at any read
                if self.frames_read == 0 and self._file.seekable():
                    self._file.seek(0)
                x = self._file.read(size, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise AudioFileError(f"{self.path}: cannot be decoded ({first_line(e)})") from None
            if x.shape[0] == 0:
                break
            if not np.isfinite(x).all():
                raise AudioFileError(f"{self.path}: contains NaN or infinite samples")
            self.frames_read += x.shape[0]
            yield x
        if self.frames_read == 0:
            raise AudioFileError(f"{self.path}: contains no audio samples")
        self.frames = self.frames_read  # the exact count, now that it is known

    def blocks_24k(self, size: int = BLOCK) -> Iterator[np.ndarray]:
        """Mono 24 kHz float32 blocks; all of them together are exactly ``frames_24k`` samples long."""
        resampler = Resampler(self.rate, SAMPLE_RATE)  # the same soxr stream as the audio callbacks
        produced = 0
        for x in self.blocks(size):
            mono = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
            y = resampler.process(mono)
            produced += y.size
            if y.size:
                yield y
        tail = resampler.process(np.zeros(0, np.float32), last=True)
        # soxr's total can differ from the exact ratio by a sample: trim or pad the end to it (soxr
        # lags behind its input, so the blocks already given never overshoot).
        keep = max(0, self.frames_24k - produced)
        tail = np.concatenate([tail[:keep], np.zeros(max(0, keep - tail.size), np.float32)])
        if tail.size:
            yield tail

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._raw.close()

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A whole file as float32 [channels, samples] and its sample rate (short files: tools, tests)."""
    with AudioReader(path) as r:
        x = np.concatenate(list(r.blocks()), axis=0)
        return x.T.copy(), r.rate


def load_mono_24k(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A whole file as 24 kHz mono float32, and its duration in seconds (short files only)."""
    with AudioReader(path) as r:
        pcm = np.concatenate(list(r.blocks_24k()))
        return pcm, r.duration


def to_pcm16(pcm: np.ndarray) -> np.ndarray:
    """float samples -> 16-bit integers (clipped to [-1, 1])."""
    return (np.clip(np.asarray(pcm, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")


class WavWriter:
    """24 kHz (or ``rate``) 16-bit WAV (or ``format``: see :func:`output_format`) written block by block
    (the header is finalised on close).

    Blocks are [samples] for mono or [samples, channels].
    """

    def __init__(
        self, path: str | os.PathLike, rate: int = SAMPLE_RATE, channels: int = 1, format: str = "WAV",
        shown: str | os.PathLike | None = None,
    ) -> None:
        self.path = Path(path)
        self.shown = shown or path  # the name errors give (the destination, when ``path`` is its temporary file)
        self.channels = channels
        try:
            self._file = sf.SoundFile(
                self.path, "w", samplerate=rate, channels=channels, subtype="PCM_16", format=format
            )
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            raise AudioFileError(f"{self.shown}: cannot be written ({first_line(e)})") from None
        self.samples = 0

    def write(self, pcm: np.ndarray) -> None:
        data = to_pcm16(pcm)
        data = data.reshape(-1) if self.channels == 1 else data.reshape(-1, self.channels)
        try:
            self._file.write(data)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioFileError(f"{self.shown}: cannot be written ({_why_write_failed(self.path, e)})") from None
        self.samples += data.shape[0]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _why_write_failed(path: Path, error: Exception) -> str:
    """libsndfile says only "System error." when the system refused a write: name the usual two causes."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY and os.path.getsize(path) + (1 << 20) > soft:
            return f"File too large: the file size limit (ulimit -f) is {soft} bytes"
        st = os.statvfs(path.parent)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return "No space left on device"
    except (ImportError, OSError):
        pass
    return first_line(error)


def write_wav(path: str | os.PathLike, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM WAV of a whole signal, [samples] or [samples, channels] (clipped to [-1, 1])."""
    pcm = np.asarray(pcm)
    with WavWriter(path, rate, 1 if pcm.ndim == 1 else pcm.shape[1]) as w:
        w.write(pcm)
