"""A speech-like test signal for Mimi, and Mimi's memory over many turns measured in a fresh process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

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
    import rustymimi

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


#: Words espeak-ng strings together into long test speech (any order is speech-like enough for Mimi).
_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wise", "owls", "sing", "about", "rain", "and", "summer", "light", "in", "the", "old", "city", "near", "the", "river", "where", "children", "play", "and", "merchants", "call", "their", "prices"]


def long_speech(path: Path, seconds: float, seed: int = 0) -> np.ndarray:
    """At least ``seconds`` of espeak-ng speech at 24 kHz mono float32 (needs espeak-ng and sox)."""
    from moshi_mlx.audio.files import read_audio

    rng = np.random.default_rng(seed)
    text = " ".join(rng.choice(_WORDS, size=int(seconds * 3.2) + 10))
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-e", "floating-point", "-b", "32", str(path)],
                   check=True, capture_output=True)
    x, rate = read_audio(path)
    assert rate == SAMPLE_RATE and x.shape[-1] >= seconds * SAMPLE_RATE, (rate, x.shape)
    return x.mean(axis=0).astype(np.float32)


def agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per codebook: the share of frames where two code arrays [K, F] agree."""
    return (np.asarray(a) == np.asarray(b)).mean(axis=1)


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-noise ratio of ``other`` against ``reference`` (the difference is the noise)."""
    noise = np.sum((np.asarray(reference, np.float64) - other) ** 2)
    return float(10 * np.log10(np.sum(np.asarray(reference, np.float64) ** 2) / max(noise, 1e-30)))
