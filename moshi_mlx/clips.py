"""Clips through the engine: a recording (in memory or streamed in blocks) answered frame by frame.

No real-time pacing and no frame dropping, unlike :class:`~moshi_mlx.engine.EngineRunner`: every 80 ms
frame is answered, in order, from a fresh conversation. The offline run (:mod:`moshi_mlx.run_inference`)
and the terminal app's offline ``--demo`` (:mod:`moshi_mlx.local`) both use it.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from .audio.frames import FRAME_S, FRAME_SIZE, SAMPLE_RATE, FrameChunker

#: Length of the offline demos' test signal (`local --demo` / `--demo-stt` with no sound card).
DEMO_SIGNAL_SECONDS = 10.0


def demo_signal(seconds: float = DEMO_SIGNAL_SECONDS) -> np.ndarray:
    """The offline demos' input at 24 kHz: a gliding tone with a syllable-like envelope standing in for a voice."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * (150 + 50 * np.sin(2 * np.pi * 0.5 * t)) * t)
    return (tone * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


def converse_stream(
    engine,
    blocks: Iterable[np.ndarray],
    sink: Callable[[np.ndarray], None],
    progress: Callable[[int], None] | None = None,
    on_text: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Feed 24 kHz mono ``blocks`` (any sizes) to the engine in 80 ms frames, from a fresh conversation.

    ``sink`` receives Moshi's audio as it comes, exactly as many samples in all as came in;
    ``progress`` the number of frames done, ``on_text`` each transcript piece as it comes. Returns the
    transcript pieces ``{"frame", "start", "text"}``, where ``start`` is the piece's time in Moshi's audio.
    """
    pieces: list[dict] = []
    chunker = FrameChunker()
    done = 0
    engine.reset()

    def step(frame: np.ndarray, keep: int) -> None:
        nonlocal done
        res = engine.process(frame)
        sink(np.asarray(res.pcm, np.float32).reshape(-1)[:keep])
        if res.text:
            pieces.append({"frame": done, "start": round(done * FRAME_S, 3), "text": res.text})
            if on_text is not None:
                on_text(pieces[-1])
        done += 1
        if progress is not None:
            progress(done)

    for block in blocks:
        for frame in chunker.push(block):
            step(frame, FRAME_SIZE)
    rest = chunker.rest()
    if rest.size:  # the last frame padded with silence; only its real part of Moshi's answer is kept
        step(np.concatenate([rest, np.zeros(FRAME_SIZE - rest.size, np.float32)]), rest.size)
    return pieces


def converse_offline(
    engine, pcm: np.ndarray, progress: Callable[[int, int], None] | None = None,
    on_text: Callable[[dict], None] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """:func:`converse_stream` on a signal held in memory; returns Moshi's audio (same length) and the pieces."""
    pcm = np.asarray(pcm, np.float32).reshape(-1)
    total = -(-pcm.size // FRAME_SIZE)
    out: list[np.ndarray] = []
    pieces = converse_stream(engine, [pcm], out.append, None if progress is None else lambda d: progress(d, total),
                             on_text)
    return (np.concatenate(out) if out else np.zeros(0, np.float32)), pieces
