"""The persona prompt on tiny models: replay vs snapshot restore, the bounds, the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest

from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.stand_ins import demo_lm
from moshi_mlx.models.config import config_tiny, config_tiny_stt
from moshi_mlx.persona import (
    SILENCE_FRAMES,
    PersonaError,
    PersonaPrompt,
    PromptSnapshots,
    check_persona_model,
    play_prompt,
    prompt_tokens,
    wrap_system,
)
from moshi_mlx.settings import GREEDY, SamplingParams
from moshi_mlx.voices import Voice, VoiceError


@pytest.fixture(scope="module")
def lm():
    return demo_lm(0)


def _preset(frames: int = 5, d: int = 256, seed: int = 0) -> Voice:
    rng = np.random.default_rng(seed)
    return Voice("p", embeddings=(0.1 * rng.standard_normal((frames, d))).astype(np.float32),
                 cache=rng.integers(0, 2048, (17, 4)).astype(np.int32))


def _tokens(outs) -> list[tuple]:
    return [(o.frame, o.text_token, tuple(o.audio_codes.tolist())) for o in outs if o is not None]


def _user(n: int = 22, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, (n, 8))


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.8, top_k=50)], ids=["greedy", "sampled"])
def test_restoring_the_snapshot_gives_the_replayed_tokens(lm, sampling):
    gen = LmGen(lm, sampling, sampling, seed=3)
    prompt = PersonaPrompt(_preset(), (40, 41, 42, 43))
    play_prompt(gen, prompt, None)
    assert gen.step_index == prompt.steps()
    snap = gen.snapshot()
    replayed = _tokens(gen.step(u) for u in _user())
    gen.reset()
    gen.restore(snap)
    restored = _tokens(gen.step(u) for u in _user())
    gen.reset()
    play_prompt(gen, prompt, None)
    replayed_again = _tokens(gen.step(u) for u in _user())
    assert restored == replayed == replayed_again
    assert restored[0][0] == 0 and len(restored) == 21  # conversation frames count from 0 after the prompt


def test_an_audio_voice_is_encoded_frame_by_frame_and_its_first_frame_skipped(lm):
    gen = LmGen(lm, GREEDY, GREEDY, seed=0)
    seen = []
    voice = Voice("w", pcm=np.ones(3 * 1920 + 5, np.float32))  # 4 frames, the last padded with zeros

    def encode(pcm):
        seen.append(pcm.copy())
        return np.full(8, len(seen), np.int32)

    play_prompt(gen, PersonaPrompt(voice, (7, 8)), encode)
    assert len(seen) == 4 and seen[-1][5:].max() == 0 and seen[-1][:5].min() == 1
    assert gen.step_index == PersonaPrompt(voice, (7, 8)).steps() == 4 + 2 * SILENCE_FRAMES + 2 - 1


def test_the_prompt_text_is_wrapped_in_system_tags():
    assert wrap_system("  You are Ada. ") == "<system> You are Ada. <system>"
    assert wrap_system("<system> x <system>") == "<system> x <system>"
    assert prompt_tokens(lambda s: [len(s)], "hi") == (len("<system> hi <system>"),)
    assert prompt_tokens(lambda s: [1], "   ") == ()


def test_a_model_without_the_persona_layout_is_refused_in_one_line():
    check_persona_model(config_tiny())
    with pytest.raises(PersonaError, match="persona model") as e:
        check_persona_model(config_tiny_stt())
    assert "\n" not in str(e.value)


def test_a_prompt_longer_than_the_context_is_refused(lm):
    prompt = PersonaPrompt(None, tuple(range(5, 105)))
    prompt.check(lm.config, 200)
    with pytest.raises(PersonaError, match="shorten"):
        prompt.check(lm.config, 100)


def test_a_preset_for_another_model_is_refused(lm):
    with pytest.raises(VoiceError, match="another model"):
        PersonaPrompt(_preset(d=64), ()).check(lm.config, 3000)
    bad_ring = Voice("r", embeddings=np.zeros((2, 256), np.float32), cache=np.zeros((9, 4), np.int32))
    with pytest.raises(VoiceError, match="another model"):
        PersonaPrompt(bad_ring, ()).check(lm.config, 3000)


def test_snapshots_are_bounded_least_recently_used_first(lm):
    gen = LmGen(lm, GREEDY, GREEDY, seed=0)
    play_prompt(gen, PersonaPrompt(None, (9,)), None)
    snap = gen.snapshot()
    # 12 steps (6 + 1 + 6, less NVIDIA's priming frame) x 4 layers x (keys + values) x 4 heads x 64 x f32
    assert snap.steps == 12 and snap.nbytes == 12 * 4 * 2 * 4 * 64 * 4
    cache = PromptSnapshots(kept=2)
    cache.put("a", snap)
    cache.put("b", snap)
    assert cache.get("a") is snap  # "a" is now the most recent
    cache.put("c", snap)
    assert cache.get("b") is None and len(cache) == 2 and cache.nbytes == 2 * snap.nbytes


def test_quantized_kv_cache_snapshots_too(lm):
    gen = LmGen(lm, GREEDY, GREEDY, seed=0, kv_bits=8)
    prompt = PersonaPrompt(None, (9, 10))
    play_prompt(gen, prompt, None)
    snap = gen.snapshot()
    a = _tokens(gen.step(u) for u in _user(8))
    gen.reset()
    gen.restore(snap)
    assert _tokens(gen.step(u) for u in _user(8)) == a


def test_a_snapshot_holds_the_prompts_slots_not_the_whole_window(lm):
    import mlx.core as mx

    gen = LmGen(lm, GREEDY, GREEDY, seed=0, kv_bits=16)
    window = gen._cache.nbytes  # 3000 slots
    prompt = PersonaPrompt(None, (9, 10))
    play_prompt(gen, prompt, None)
    before = mx.get_active_memory()
    snaps = []
    for _ in range(3):
        gen.reset()
        play_prompt(gen, prompt, None)
        snaps.append(gen.snapshot())
    grown = mx.get_active_memory() - before
    assert sum(s.nbytes for s in snaps) < window / 50  # 3 x 13 of 3000 slots
    assert grown < window / 2  # slices would have pinned one whole window per snapshot


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_a_prefilled_prompt_answers_as_a_stepped_one(lm, kv_bits):
    prompt = PersonaPrompt(_preset(frames=7), tuple(range(20, 90)))  # 7 + 12 + 70 steps: two prefill chunks
    runs = []
    for batched in (False, True):
        gen = LmGen(lm, GREEDY, GREEDY, seed=0, kv_bits=kv_bits)
        play_prompt(gen, prompt, None, batched=batched)
        assert gen.step_index == prompt.steps() == 89
        runs.append(_tokens(gen.step(u) for u in _user(12)))
    assert runs[0] == runs[1] and len(runs[0]) == 11


def test_a_prefill_refuses_a_step_it_would_have_to_sample(lm):
    gen = LmGen(lm, GREEDY, GREEDY, seed=0)
    for u in _user(3):
        gen.step(u)  # sampled frames: position 3 of the delayed codebooks is nobody's decision yet
    with pytest.raises(ValueError, match="decide every stream"):
        gen.prefill([(np.zeros(8, np.int32), np.full(9, 5, np.int32), None)])
