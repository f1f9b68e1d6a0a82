"""A speech-like test signal for Mimi, and Mimi's memory over many turns measured in a fresh process."""

from __future__ import annotations

import numpy as np
import rustymimi

from moshi_mlx.audio.frames import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.audio.mimi import Mimi


def speechy(n_frames: int, seed: int = 0) -> np.ndarray:
    """A voice-like test signal: harmonic tone with gliding pitch, syllable-rate envelope and noise."""
    rng = np.random.default_rng(seed)
    n = n_frames * FRAME_SIZE
    t = np.arange(n) / SAMPLE_RATE
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, 8))
    env = np.clip(np.sin(2 * np.pi * 3.3 * t), 0, None) ** 2
    x = 0.15 * env * tone + 0.01 * rng.standard_normal(n)
    return x.astype(np.float32)


def rss_mb() -> float:
    from moshi_mlx.memory import rss_bytes

    return rss_bytes() / 2**20


def growth_over_turns(mimi_path: str) -> dict:
    """RSS growth over 280 frames: a bare rustymimi instance, then a Mimi direction with short turns."""
    n, warm = 280, 40
    x = speechy(1, seed=10)
    bare = rustymimi.Tokenizer(str(mimi_path), max_seq_len=2 * (n + warm) + 70_000)
    frame = x.reshape(1, 1, FRAME_SIZE)
    for _ in range(warm):
        bare.encode_step(frame)
    r0 = rss_mb()
    for _ in range(n):
        bare.encode_step(frame)
    bare_growth = rss_mb() - r0
    del bare
    m = Mimi(mimi_path, max_frames=30, overlap_frames=5)
    for _ in range(warm):
        m.encode_frame(x)
    r0 = rss_mb()
    for _ in range(n):
        m.encode_frame(x)
    return {"bare": bare_growth, "mimi": rss_mb() - r0, "handoffs": m.encoder_handoffs}
