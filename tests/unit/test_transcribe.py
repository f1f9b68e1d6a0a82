"""Timed words from a speech-to-text model (moshi_mlx/transcribe.py).

The word rules are checked on scripted token streams (a stand-in tokenizer of a few pieces, so multi-piece
words and boundaries can be written down). The transcriber runs a tiny random STT model (`config_tiny_stt`:
Kyutai's layout, stt_config of stt-1b-en_fr) through LmGen; most tests feed it through a stand-in encoder
(codes computed from the samples, recording what it was given: the silence it must add is then visible, and no
385 MB Mimi is loaded per test); tests/e2e/test_transcribe.py runs the real rustymimi codec (random weights)
and the stand-in 8000-piece SentencePiece tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.audio.frames import FRAME_RATE, FRAME_SIZE
from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.models.config import SttConfig, config_tiny, config_tiny_stt
from moshi_mlx.settings import GREEDY
from moshi_mlx.transcribe import TranscribeError, Transcriber, Word, WordTimer, transcribe

PAD, EOP = 3, 0


class Pieces:
    """A stand-in tokenizer: a few pieces (" " marks a word start, as TextTokenizer renders "▁")."""

    TABLE: ClassVar[dict[int, str]] = {10: " hel", 11: "lo", 12: " world", 13: " a", 14: " b", 15: "c"}

    def __init__(self, table: dict[int, str] | None = None) -> None:
        self.table = self.TABLE if table is None else table

    def piece(self, token: int) -> str | None:
        return self.table.get(token)


class RecordingEncoder:
    """Stands in for Mimi: 32 codes from the frame's samples (silence -> zeros); keeps every frame it got."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def encode_frame(self, pcm: np.ndarray) -> np.ndarray:
        self.frames.append(np.array(pcm))
        return (np.abs(pcm[:32]) * 1e4).astype(np.int32) % 2048


def times(timer: WordTimer, tokens: list[int]) -> list[Word]:
    words = []
    for token in tokens:
        words += timer.push(token)
    return words


def test_words_open_at_their_first_piece_and_close_at_the_next_boundary():
    timer = WordTimer(Pieces(), offset_seconds=0.0)
    words = times(timer, [PAD, PAD, EOP, 10, 11, PAD, PAD, EOP, 12, PAD, 13, 14, 15])
    step = 1 / FRAME_RATE
    assert words == [Word("hello", 3 * step, 7 * step), Word("world", 8 * step, 10 * step),
                     Word("a", 10 * step, 11 * step)]
    assert timer.partial == " bc"
    assert timer.finish() == [Word("bc", 11 * step, 13 * step)]
    assert timer.finish() == []


def test_times_move_back_by_the_offset_and_never_go_below_zero():
    timer = WordTimer(Pieces(), offset_seconds=0.5)  # 0.5 s = 6.25 steps
    words = times(timer, [10, EOP] + [PAD] * 8 + [12, EOP])
    assert words == [Word("hel", 0.0, 0.0), Word("world", pytest.approx(10 / FRAME_RATE - 0.5),
                                                   pytest.approx(11 / FRAME_RATE - 0.5))]


def test_a_word_still_open_at_the_end_gets_at_most_one_second():
    timer = WordTimer(Pieces(), offset_seconds=0.0)
    times(timer, [EOP, 12] + [PAD] * 40)
    (word,) = timer.finish()
    assert (word.start, word.end) == (pytest.approx(1 / FRAME_RATE), pytest.approx(1 / FRAME_RATE + 1.0))
    timer = WordTimer(Pieces(), offset_seconds=0.0)
    times(timer, [EOP, 12] + [PAD] * 40)
    assert timer.finish(limit=0.5)[0].end == 0.5 and timer.finish(limit=0.5) == []


@pytest.fixture(scope="module")
def stt_model():
    mx.random.seed(4)
    model = build_model(config_tiny_stt(), None, mx.float32)
    mx.eval(model.parameters())
    return model


def _speech(frames: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.2, 0.9, FRAME_SIZE).astype(np.float32) for _ in range(frames)]


def _expected_words(tokens: list[int], first_input_step: int, delay: float) -> list[tuple[int, float]]:
    """Independent of WordTimer: every token but padding starts a word; its time by the rule in the docstring."""
    return [(t, (step - first_input_step) / FRAME_RATE - delay) for step, t in enumerate(tokens) if t not in (PAD, EOP)]


@pytest.mark.parametrize("stt", [SttConfig(0.5, 0.0), SttConfig(2.5, 1.0)], ids=["1b_en_fr", "2.6b_en"])
def test_the_transcriber_adds_the_silences_and_takes_the_delay_back(stt_model, stt, monkeypatch):
    """Prefix silence before the input, the delay's worth of silence after it (ceil to whole frames, as
    Kyutai's scripts), every step's token read, and the times moved back by prefix + delay."""
    gen = LmGen(stt_model, GREEDY, GREEDY)
    tokens: list[int] = []
    submit = gen.submit

    def spy(codes):  # the tokens the model sampled; stand-in pieces for ids 10..15 make them words
        pending = submit(codes)
        tokens.append(int(pending.raw_tokens[0]))
        return pending

    monkeypatch.setattr(gen, "submit", spy)
    encoder = RecordingEncoder()
    speech = _speech(20)
    list(transcribe(speech, gen, encoder, Pieces(), stt))
    prefix, flush = math.ceil(stt.audio_silence_prefix_seconds * FRAME_RATE), math.ceil(stt.audio_delay_seconds * FRAME_RATE)
    assert len(encoder.frames) == prefix + 20 + flush == len(tokens)
    assert all(not f.any() for f in encoder.frames[:prefix] + encoder.frames[prefix + 20 :])
    assert all(np.array_equal(a, b) for a, b in zip(encoder.frames[prefix : prefix + 20], speech, strict=True))
    # Again (greedy: the same tokens), with a word for every id the model wrote: every token starts a word.
    words_of = Pieces({t: f" w{t}" for t in set(tokens) - {PAD, EOP}})
    words = list(transcribe(speech, LmGen(stt_model, GREEDY, GREEDY), RecordingEncoder(), words_of, stt))
    want = _expected_words(tokens, prefix, stt.audio_delay_seconds)
    assert len(want) > 10
    duration = 20 / FRAME_RATE
    assert [w.text for w in words] == [f"w{t}" for t, _ in want]
    for word, (_, start) in zip(words, want, strict=True):
        assert word.start == pytest.approx(min(max(start, 0.0), duration))
        assert 0.0 <= word.start <= word.end <= duration


def test_transcriber_uses_the_model_stt_config_and_reports_pauses(stt_model):
    transcriber = Transcriber(LmGen(stt_model, GREEDY, GREEDY, extra_heads=True), RecordingEncoder(), Pieces())
    assert transcriber.stt == SttConfig(0.5, 0.0) and transcriber.flush_frames == 7
    transcriber.feed(_speech(1)[0])
    assert len(transcriber.pause_probabilities) == 4
    assert all(0.0 <= p <= 1.0 for p in transcriber.pause_probabilities)
    transcriber.finish()
    with pytest.raises(TranscribeError, match="finished"):
        transcriber.feed(_speech(1)[0])


def test_refusals_are_one_line(stt_model):
    mx.random.seed(0)
    moshi = build_model(config_tiny(), None, mx.float32)
    with pytest.raises(TranscribeError, match="text-only"):
        Transcriber(LmGen(moshi), RecordingEncoder(), Pieces())
    no_stt = build_model(dataclasses.replace(config_tiny_stt(), stt=None), None, mx.float32)
    with pytest.raises(TranscribeError, match="no stt_config"):
        Transcriber(LmGen(no_stt), RecordingEncoder(), Pieces())
    transcriber = Transcriber(LmGen(stt_model), RecordingEncoder(), Pieces())
    with pytest.raises(TranscribeError, match="1920 samples, got 100"):
        transcriber.feed(np.zeros(100, np.float32))


def test_end_of_turn_is_said_once_until_a_new_word(stt_model, monkeypatch):
    """Head 2's first probability above 0.5 marks an end of turn (Kyutai's rule), once, re-armed by new text.
    The heads' numbers themselves are checked against PyTorch in test_kyutai_stt_parity.py; here a script of
    probabilities stands in for them so the rule is visible."""
    script = iter([0.9, 0.9, 0.1, 0.9, 0.9] * 4)

    def probs(hidden):
        p = next(script)
        head = mx.array([[[p, 1 - p, 0, 0, 0, 0]]], dtype=mx.float32)
        return [head, head, head, head]

    monkeypatch.setattr(stt_model, "extra_head_probs", probs)
    silent = Transcriber(LmGen(stt_model, GREEDY, GREEDY, extra_heads=True), RecordingEncoder(), Pieces({}))
    for frame in _speech(5):
        silent.feed(frame)
    assert silent.turn_ends == [1 / FRAME_RATE]  # no text ever re-arms it: said once, at the first frame
    talking = Transcriber(LmGen(stt_model, GREEDY, GREEDY, extra_heads=True), RecordingEncoder(),
                          Pieces({t: f" w{t}" for t in range(8000)}))
    for frame in _speech(5):
        talking.feed(frame)
    assert talking.turn_ends == pytest.approx([k / FRAME_RATE for k in (1, 2, 4, 5)])  # every word re-arms it
