"""A 16-bit PCM WAV that stays readable while it grows: for recordings that must survive a crash.

:class:`WavStream` appends blocks of samples and, on :meth:`~WavStream.commit`, rewrites the two size
fields of the header to cover exactly the samples written so far, then flushes (and fsyncs) the file.
The data always reaches the file before the header that counts it, so a process killed at any moment
(``kill -9``, a crash, power loss after an fsync) leaves a valid WAV holding everything up to the last
commit. A plain 44-byte RIFF header is written by hand: libsndfile only fixes its header on close.

:func:`stereo_to_mixed` derives the mono mix of a stereo recording in blocks (bounded memory).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

#: The header's fixed size and where the two sizes it must keep true sit in it.
HEADER_BYTES = 44
RIFF_SIZE_AT = 4
DATA_SIZE_AT = 40
#: A RIFF file counts its bytes in 32 bits: a recording stops growing before that (about 12 h of 24 kHz stereo).
MAX_DATA_BYTES = 0xFFFFFFFF - HEADER_BYTES


class WavFull(OSError):
    """The WAV reached the 4 GB a RIFF header can count."""


def _header(channels: int, rate: int, data_bytes: int) -> bytes:
    block = 2 * channels
    return (
        b"RIFF" + struct.pack("<I", HEADER_BYTES - 8 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
        + b"data" + struct.pack("<I", data_bytes)
    )


class WavStream:
    """16-bit PCM WAV written block by block, its header kept true at every :meth:`commit`.

    ``new=True`` creates the file exclusively (an existing file is never replaced: FileExistsError).
    Blocks are int16 arrays [samples] (mono) or [samples, channels].
    """

    def __init__(self, path: str | os.PathLike, channels: int, rate: int, new: bool = True) -> None:
        self.path = Path(path)
        self.channels, self.rate = channels, rate
        self.frames = 0  # written
        self.committed = 0  # counted by the header on disk
        self.block = 2 * channels  # bytes per frame
        self._f: BinaryIO = open(self.path, "xb" if new else "wb", buffering=0)  # a failed write leaves no buffer
        try:
            self._f.write(_header(channels, rate, 0))
        except BaseException:
            self._f.close()
            raise

    @property
    def fileno(self) -> int:
        return self._f.fileno()

    def write(self, pcm16: np.ndarray) -> None:
        data = np.ascontiguousarray(pcm16, "<i2").reshape(-1, self.channels)
        if (self.frames + data.shape[0]) * self.block > MAX_DATA_BYTES:
            raise WavFull(f"{self.path.name}: a WAV file cannot hold more than 4 GB")
        start = HEADER_BYTES + self.frames * self.block
        view = memoryview(data.tobytes())
        try:
            while view:
                view = view[self._f.write(view) :]
        except BaseException:  # a full disk, a file-size limit: the block is whole or absent
            os.ftruncate(self._f.fileno(), start)
            self._f.seek(start)
            raise
        self.frames += data.shape[0]

    def commit(self, sync: bool = True) -> None:
        """Make the header count every frame written so far (data first, then the sizes)."""
        data_bytes = self.frames * self.block
        end = self._f.tell()
        self._f.seek(RIFF_SIZE_AT)
        self._f.write(struct.pack("<I", HEADER_BYTES - 8 + data_bytes))
        self._f.seek(DATA_SIZE_AT)
        self._f.write(struct.pack("<I", data_bytes))
        self._f.seek(end)
        if sync:
            os.fsync(self._f.fileno())
        self.committed = self.frames

    def close(self) -> None:
        if not self._f.closed:
            try:
                self.commit()
            finally:
                self._f.close()

    def __enter__(self) -> "WavStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_frames(path: str | os.PathLike, block: int) -> Iterator[np.ndarray]:
    """The int16 frames [n, channels] of a WAV this module wrote, ``block`` frames at a time, as far as its
    header counts them (the bytes after that are a write the crash cut short)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        channels = struct.unpack_from("<H", head, 22)[0]
        remaining = struct.unpack_from("<I", head, DATA_SIZE_AT)[0] // (2 * channels)
        while remaining > 0:
            n = min(block, remaining)
            raw = f.read(n * 2 * channels)
            got = len(raw) // (2 * channels)
            if got == 0:
                return
            yield np.frombuffer(raw[: got * 2 * channels], "<i2").reshape(got, channels)
            remaining -= got


def stereo_to_mixed(src: str | os.PathLike, dst: str | os.PathLike, rate: int, block: int = 1 << 16) -> int:
    """Write the mono mix (sum, clipped) of the stereo WAV ``src`` to ``dst`` (replaced); returns its frames."""
    with WavStream(dst, 1, rate, new=False) as out:
        for frames in read_frames(src, block):
            out.write(np.clip(frames.astype(np.int32).sum(axis=1), -32767, 32767).astype("<i2"))
        return out.frames

