"""moshi_mlx.net.opus: Ogg/Opus pages <-> 80 ms frames through the real sphn codec."""

from __future__ import annotations

import numpy as np
import pytest

from moshi_mlx.audio.frames import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.net.opus import OpusDecodeError, OpusFrames

TONE_HZ = 440.0


def tone(frames: int, hz: float = TONE_HZ) -> list[np.ndarray]:
    t = np.arange(frames * FRAME_SIZE) / SAMPLE_RATE
    x = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return [x[i * FRAME_SIZE : (i + 1) * FRAME_SIZE] for i in range(frames)]


def pages_of(frames: list[np.ndarray]) -> list[bytes]:
    sender = OpusFrames()
    return [p for p in (sender.encode(f) for f in frames) if p]


def decode_all(receiver: OpusFrames, pages: list[bytes]) -> list[np.ndarray]:
    return [frame for page in pages for frame in receiver.decode(page)]


def dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)[int(np.argmax(spectrum))])


def test_a_tone_round_trips_in_whole_frames():
    sent = tone(25)
    got = decode_all(OpusFrames(), pages_of(sent))
    assert len(got) >= 20  # the codec's look-ahead keeps the last few in the encoder
    assert all(f.shape == (FRAME_SIZE,) and f.dtype == np.float32 for f in got)
    x = np.concatenate(got[5:])  # past the codec's start-up
    assert abs(dominant_hz(x) - TONE_HZ) < 20
    assert 0.15 < float(np.sqrt(np.mean(x**2))) < 0.3  # the tone's RMS is 0.21


def test_encode_may_hold_a_frame_back_until_a_page_is_full():
    opus = OpusFrames()
    pages = [opus.encode(f) for f in tone(10)]
    assert any(pages) and all(isinstance(p, bytes) for p in pages)


def test_garbage_page_resets_the_decoder_then_the_stream_recovers():
    receiver = OpusFrames()
    good = pages_of(tone(25))
    with pytest.raises(OpusDecodeError):
        receiver.decode(b"this is not an Ogg page at all" * 4)
    assert receiver.bad_pages == 1
    got = decode_all(receiver, good)  # a fresh stream, from its first (header) page
    assert len(got) >= 20 and abs(dominant_hz(np.concatenate(got[5:])) - TONE_HZ) < 20


def test_frames_are_rechunked_whatever_the_page_sizes():
    receiver = OpusFrames()
    got = decode_all(receiver, pages_of(tone(12)))
    assert 0 <= receiver.pending < FRAME_SIZE
    assert all(len(f) == FRAME_SIZE for f in got)
