"""Live captions: a text-only (speech-to-text) model through ConversationEngine and EngineRunner.

A tiny random STT model (`config_tiny_stt`: Kyutai's STT layout, 4 VAD heads) runs for real; Mimi is stood in for
by an encoder that computes codes from the samples and keeps what it was given (the real codec is 385 MB and
runs in tests/e2e/test_local_captions.py), and the tokenizer by a table that gives every token a piece, so a
random model writes words.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.audio.frames import FRAME_RATE, FRAME_SIZE
from moshi_mlx.engine import ConversationEngine, EngineRunner, FrameResult
from moshi_mlx.errors import MoshiError
from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.models.cache import DEFAULT_KV_BITS
from moshi_mlx.models.config import SttConfig, config_tiny_stt
from moshi_mlx.settings import GREEDY
from moshi_mlx.transcribe import Transcriber, transcribe


class Codec:
    """Stands in for Mimi's encoder: 32 codes from the samples; records the frames and resets."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.resets = 0

    def encode_frame(self, pcm: np.ndarray) -> np.ndarray:
        self.frames.append(np.array(pcm))
        return (np.abs(pcm[:32]) * 1e4).astype(np.int32) % 2048

    def decode_frame(self, codes: np.ndarray) -> np.ndarray:
        raise AssertionError("a text-only model has nothing to decode")

    def reset(self) -> None:
        self.resets += 1


class EveryToken:
    """Every token a piece: even ids start a word, odd ones continue it; padding (3) and 0 stay silent."""

    def piece(self, token: int) -> str | None:
        if token in (0, 3):
            return None
        return f" w{token}" if token % 2 == 0 else f"x{token}"


@pytest.fixture(scope="module")
def stt_model():
    mx.random.seed(3)
    return evaluated(build_model(config_tiny_stt(), None, mx.float32))


def evaluated(model):
    """Random weights computed here, as a load does (lazy arrays of this thread cannot run on the engine's)."""
    mx.eval(model.parameters())
    return model


def speech(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.9, 0.9, FRAME_SIZE).astype(np.float32) for _ in range(n)]


def test_engine_captions_equal_the_offline_transcript(stt_model):
    """The engine's words (frame by frame, then flush) are the offline transcriber's, same times; no audio."""
    frames = speech(30)
    expected = list(transcribe(frames, LmGen(stt_model, GREEDY, GREEDY, kv_bits=DEFAULT_KV_BITS, extra_heads=True),
                               Codec(), EveryToken()))
    engine = ConversationEngine(stt_model, Codec(), EveryToken())
    try:
        engine.warmup()
        results = [engine.process(f) for f in frames]
        words = [w for r in results for w in r.words] + engine.flush()
    finally:
        engine.close()
    assert expected and words == expected
    assert all(r.pcm is None for r in results)
    assert all(r.pauses is not None and len(r.pauses) == 4 for r in results)
    assert all(0.0 <= r.end_of_turn <= 1.0 for r in results)
    assert "".join(r.text or "" for r in results).split()[0].startswith("w")  # the pieces, as Moshi's text


def test_runner_has_no_decode_stage_and_hands_out_words(stt_model):
    codec = Codec()
    engine = ConversationEngine(stt_model, codec, EveryToken())
    got: list[FrameResult] = []
    done = threading.Event()

    def on_result(r: FrameResult) -> None:
        got.append(r)
        if len(got) == 12:
            done.set()

    try:
        runner = EngineRunner(engine, on_result, max_pending=50)
        with runner:
            assert sorted(t.name for t in runner._threads) == ["moshi-encode"]
            for f in speech(12):
                runner.push(f)
            assert done.wait(30)
    finally:
        engine.close()
    assert [r.frame for r in got] == list(range(12)) and runner.stats.dropped == 0
    assert all(r.pcm is None and set(r.timings_ms) == {"encode", "lm"} for r in got)


def test_the_silence_prefix_is_fed_at_reset_before_any_input(stt_model):
    """An STT model trained with a silence prefix gets it when the conversation starts, not in the audio path."""
    model = evaluated(build_model(dataclasses.replace(config_tiny_stt(), stt=SttConfig(0.5, 0.25)), None, mx.float32))
    codec = Codec()
    engine = ConversationEngine(model, codec, EveryToken())
    try:
        assert len(codec.frames) == 4 and not any(f.any() for f in codec.frames)  # ceil(0.25 * 12.5) frames
        engine.reset()
        assert len(codec.frames) == 8 and codec.resets == 1
    finally:
        engine.close()


def test_dropped_frames_move_the_words_clock(stt_model):
    """Frames a live runner dropped count in the input's time: the same tokens, stamped that much later."""
    frames = speech(20, seed=5)
    plain = Transcriber(LmGen(stt_model, GREEDY, GREEDY, extra_heads=True), Codec(), EveryToken())
    skipping = Transcriber(LmGen(stt_model, GREEDY, GREEDY, extra_heads=True), Codec(), EveryToken())
    words_a, words_b = [], []
    for i, f in enumerate(frames):
        words_a += plain.feed(f)
        if i == 0:
            skipping.skip(5)  # five frames dropped before the first one the model saw
        words_b += skipping.feed(f)
    words_a += plain.finish()
    words_b += skipping.finish()
    assert words_a and [w.text for w in words_a] == [w.text for w in words_b]
    shift = 5 / FRAME_RATE
    assert all(abs(b.start - max(0.0, a.start + shift)) < 1e-6 or a.start == 0.0
               for a, b in zip(words_a, words_b))
    assert skipping.frames == 25


def test_a_text_only_model_needs_its_tokenizer(stt_model):
    with pytest.raises(MoshiError, match="tokenizer") as err:
        ConversationEngine(stt_model, Codec(), None)
    assert "\n" not in str(err.value)


def test_runner_drops_oldest_when_behind(stt_model):
    """Lag as for Moshi: a burst beyond max_pending is dropped oldest first and counted; the rest is captioned."""
    engine = ConversationEngine(stt_model, Codec(), EveryToken())
    got: list[FrameResult] = []
    try:
        with EngineRunner(engine, got.append, max_pending=2) as runner:
            for f in speech(40):
                runner.push(f)
            deadline = time.monotonic() + 30
            while runner.stats.frames_out + runner.stats.dropped < 40 and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        engine.close()
    assert runner.stats.dropped > 0
    assert runner.stats.frames_out + runner.stats.dropped == 40
    assert engine.transcriber.frames == 40  # dropped frames counted into the words' clock
