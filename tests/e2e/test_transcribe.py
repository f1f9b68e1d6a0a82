"""Timed words through the real codec: rustymimi (random weights, 32 codebooks), a tiny random STT model and the
stand-in 8000-piece SentencePiece tokenizer (about 7 s: the tokenizer is trained and Mimi loaded)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from moshi_mlx.audio.frames import FRAME_SIZE
from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.models.config import config_tiny_stt
from moshi_mlx.settings import GREEDY
from moshi_mlx.transcribe import transcribe


def test_real_mimi_and_sentencepiece_stand_ins(demo_files, tmp_path):
    """The whole path with the real codec (rustymimi, random weights, 32 codebooks) and the stand-in
    8000-piece SentencePiece tokenizer: words are the tokenizer's made-up words, in time order."""
    from moshi_mlx.audio.mimi import Mimi
    from moshi_mlx.model_files.stand_ins import write_stand_in_tokenizer
    from moshi_mlx.tokenizer import TextTokenizer

    mx.random.seed(4)
    stt_model = build_model(config_tiny_stt(), None, mx.float32)
    rng = np.random.default_rng(1)
    speech = [rng.uniform(0.2, 0.9, FRAME_SIZE).astype(np.float32) for _ in range(25)]
    tokenizer = TextTokenizer(write_stand_in_tokenizer(tmp_path / "tok8000.model", 8000))
    with Mimi(demo_files.mimi_path, num_codebooks=32) as mimi:
        words = list(transcribe(speech, LmGen(stt_model, GREEDY, GREEDY), mimi, tokenizer))
    assert words, "a random model writes some words"
    assert all(w.text and " " not in w.text for w in words)
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(0.0 <= w.start <= w.end <= 2.0 for w in words)
