"""ConversationEngine with a persona prompt (demo model: PersonaPlex's codebook layout, random weights)."""

from __future__ import annotations

import numpy as np
import pytest

from moshi_mlx.audio.files import write_wav
from moshi_mlx.engine import ConversationEngine
from moshi_mlx.persona import PersonaError
from moshi_mlx.settings import GREEDY, EngineSettings
from moshi_mlx.voices import VoiceError


def _frames(n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(n)]


def _tokens(engine: ConversationEngine) -> list:
    return [engine.process(f).text_token for f in _frames()]


def test_each_conversation_restores_the_prompt_and_answers_the_same(demo_assets_loaded, tmp_path):
    a = demo_assets_loaded
    t = np.arange(12_000) / 24_000
    write_wav(tmp_path / "v.wav", (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    settings = EngineSettings(text=GREEDY, audio=GREEDY, seed=2, text_prompt="You are Ada.", voice=str(tmp_path / "v.wav"))
    engine = ConversationEngine(a.lm, a.mimi, a.tokenizer, settings)
    try:
        assert engine.prompt is not None and not engine.prompt_restored
        first = _tokens(engine)
        engine.reset()
        assert engine.prompt_restored and len(engine.snapshots) == 1
        assert _tokens(engine) == first
        engine.reset(EngineSettings(text=GREEDY, audio=GREEDY, seed=2))  # no prompt: plain Moshi again
        plain = _tokens(engine)
        assert engine.prompt is None and plain != first
        with pytest.raises(VoiceError, match="unknown voice"):
            engine.reset(EngineSettings(voice="NATF0"))
        engine.reset()  # the refused settings changed nothing
        assert engine.settings.voice is None and _tokens(engine) == plain
    finally:
        engine.close()


def test_a_prompt_longer_than_the_window_is_one_line(demo_assets_loaded):
    a = demo_assets_loaded
    with pytest.raises(PersonaError, match="shorten"):
        ConversationEngine(a.lm, a.mimi, a.tokenizer, EngineSettings(text_prompt="word " * 400, context=64))


def test_the_benchmark_times_the_prompt_played_and_restored(demo_assets_loaded):
    from moshi_mlx.benchmark.pipeline import time_prompt

    a = demo_assets_loaded
    engine = ConversationEngine(a.lm, a.mimi, a.tokenizer, EngineSettings(text_prompt="You are Ada, who likes maps."))
    try:
        t = time_prompt(engine, runs=1)
    finally:
        engine.close()
    assert t.steps == engine.prompt.steps() > 2 * 6
    assert 0 < t.warm_ms < t.cold_ms and t.snapshot_mb > 0


class _CountingMimi:
    """The real Mimi, counting encoded frames."""

    def __init__(self, mimi) -> None:
        self.mimi, self.encoded = mimi, 0

    def encode_frame(self, pcm):
        self.encoded += 1
        return self.mimi.encode_frame(pcm)

    def __getattr__(self, name):
        return getattr(self.mimi, name)


def test_a_voice_recording_is_encoded_once_for_several_roles(demo_assets_loaded, tmp_path):
    a = demo_assets_loaded
    write_wav(tmp_path / "v.wav", (0.2 * np.sin(np.arange(9600) / 7)).astype(np.float32))  # 0.4 s: 5 frames
    mimi = _CountingMimi(a.mimi)
    engine = ConversationEngine(a.lm, mimi, a.tokenizer, EngineSettings(text_prompt="Ada.", voice=str(tmp_path / "v.wav")))
    try:
        assert mimi.encoded == 5
        engine.reset(EngineSettings(text_prompt="Bea.", voice=str(tmp_path / "v.wav")))
        assert mimi.encoded == 5 and not engine.prompt_restored and len(engine.snapshots) == 2
    finally:
        engine.close()
