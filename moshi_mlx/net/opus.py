"""Ogg/Opus pages <-> 80 ms frames of 24 kHz mono audio: the codec both ends of the WebSocket use.

Kyutai's protocol carries audio as Ogg/Opus pages (kind 0x01). :class:`OpusFrames` wraps sphn's
streaming reader and writer: pages in, whole 1920-sample float32 frames out (re-chunked with
:class:`~moshi_mlx.audio.frames.FrameChunker`, whatever the pages' durations); frames in, pages out.
A page the decoder cannot read raises :class:`OpusDecodeError` after the decoder has been replaced,
so the stream goes on with the next good page (sphn's reader is unusable after any error).

The reader and the writer are separate objects: one thread may decode while another encodes (the
server encodes on the engine's thread, decodes on the event loop).
"""

from __future__ import annotations

import numpy as np

from ..audio.frames import FRAME_SIZE, SAMPLE_RATE, FrameChunker
from ..errors import first_line


class OpusDecodeError(ValueError):
    """A page that could not be decoded; the decoder has been reset already."""


class OpusFrames:
    """One Ogg/Opus stream each way, in frames of ``frame_size`` samples at ``sample_rate``."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, frame_size: int = FRAME_SIZE) -> None:
        import sphn  # imported here: the protocol and its tests need no codec

        self._sphn = sphn
        self.sample_rate = sample_rate
        self._reader = sphn.OpusStreamReader(sample_rate)
        self._writer = sphn.OpusStreamWriter(sample_rate)
        self._chunker = FrameChunker(frame_size)
        self.bad_pages = 0

    @property
    def pending(self) -> int:
        """Decoded samples held back, waiting for the rest of their frame."""
        return self._chunker.pending

    def decode(self, page: bytes) -> list[np.ndarray]:
        """The whole frames this page completes (often none: Opus packets are shorter than 80 ms)."""
        try:
            pcm = self._reader.append_bytes(page)
        except Exception as e:  # sphn raises ValueError (and may raise others) on garbage
            self.bad_pages += 1
            self._reader = self._sphn.OpusStreamReader(self.sample_rate)
            raise OpusDecodeError(first_line(e)) from None
        return self._chunker.push(pcm)

    def encode(self, frame: np.ndarray) -> bytes:
        """The Ogg pages completed by this frame (may be b"": the writer buffers until a page is full)."""
        return self._writer.append_pcm(np.ascontiguousarray(frame, dtype=np.float32).reshape(-1))
