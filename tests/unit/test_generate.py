
import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.models.cache import StepContext
from moshi_mlx.models.config import config_tiny
from moshi_mlx.settings import GREEDY, SamplingParams, TextControls


@pytest.fixture(scope="module")
def tiny_model():
    mx.random.seed(0)
    model = build_model(config_tiny(), None, mx.float32)
    mx.eval(model.parameters())
    return model


def user_frames(n, seed=0):
    return np.random.default_rng(seed).integers(0, 2048, (n, 8))


def run(gen, frames):
    return [gen.step(f) for f in frames]


def test_outputs_start_after_the_delay_and_have_the_right_shape(tiny_model):
    gen = LmGen(tiny_model, seed=1)
    outs = run(gen, user_frames(5))
    assert outs[0] is None
    for i, out in enumerate(outs[1:]):
        assert out.frame == i
        assert out.audio_codes.shape == (8,) and out.audio_codes.dtype == np.int32
        assert np.all((out.audio_codes >= 0) & (out.audio_codes < 2048))
        assert 0 <= out.text_token < 32000


def test_output_frames_undo_the_codebook_delays(tiny_model):
    gen = LmGen(tiny_model, seed=2)
    raw, outs = [], []
    for frame in user_frames(6):
        pending = gen.submit(frame)
        raw.append(pending.raw_tokens)
        outs.append(pending.result())
    for step in range(1, 6):
        out = outs[step]
        # Text and codebook 0 (delay 0) were sampled one step before codebooks 1..7 (delay 1).
        assert out.text_token == raw[step - 1][0]
        assert out.audio_codes[0] == raw[step - 1][1]
        assert np.array_equal(out.audio_codes[1:], raw[step][2:])


def test_inputs_use_start_tokens_and_the_previous_user_frame(tiny_model, monkeypatch):
    """Step t reads position t - 1 of every stream (user frame t - 1 - delay); learned start tokens
    (text 32000, audio 2048) where a stream has nothing yet, as Kyutai's MLX and Rust LmGen do."""
    inputs, raw = [], []
    temporal = tiny_model.temporal

    def spy(tokens, caches, ctx, condition=None):
        inputs.append(np.array(tokens)[0])
        return temporal(tokens, caches, ctx, condition)

    monkeypatch.setattr(tiny_model, "temporal", spy)
    gen = LmGen(tiny_model, GREEDY, GREEDY)
    frames = user_frames(4).astype(np.int32)
    for frame in frames:
        pending = gen.submit(frame)
        raw.append(pending.raw_tokens)
        pending.result()
    text_start, audio_start = 32000, 2048
    assert inputs[0].tolist() == [text_start] + [audio_start] * 16  # nothing exists at step 0
    # Step 1: Moshi's text and codebook 0 (delay 0) from step 0; delayed codebooks still start tokens;
    # the user's frame 0 for codebook 0, nothing yet for the delayed user codebooks.
    assert inputs[1].tolist() == [raw[0][0], raw[0][1]] + [audio_start] * 7 + [frames[0][0]] + [audio_start] * 7
    # Step 2 onwards: everything from the previous step; user codebooks 1..7 lag one more frame.
    for t in (2, 3):
        assert inputs[t][:9].tolist() == raw[t - 1].tolist()
        assert inputs[t][9] == frames[t - 1][0]
        assert inputs[t][10:].tolist() == frames[t - 2][1:].tolist()


def test_same_seed_same_conversation_and_different_seed_differs(tiny_model):
    a = run(LmGen(tiny_model, seed=7), user_frames(8))
    b = run(LmGen(tiny_model, seed=7), user_frames(8))
    c = run(LmGen(tiny_model, seed=8), user_frames(8))
    key = lambda outs: [(o.text_token, o.audio_codes.tolist()) for o in outs if o]
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_reset_replays_a_seeded_sampled_conversation(tiny_model):
    gen = LmGen(tiny_model, seed=11)
    first = run(gen, user_frames(6))
    gen.reset()
    second = run(gen, user_frames(6))
    assert [o.audio_codes.tolist() for o in first if o] == [o.audio_codes.tolist() for o in second if o]


def test_reset_replays_the_same_conversation(tiny_model):
    gen = LmGen(tiny_model, GREEDY, GREEDY)
    first = run(gen, user_frames(6))
    gen.reset()
    second = run(gen, user_frames(6))
    assert [o.audio_codes.tolist() for o in first if o] == [o.audio_codes.tolist() for o in second if o]


def test_greedy_is_reproducible_across_instances(tiny_model):
    a = run(LmGen(tiny_model, GREEDY, GREEDY, seed=1), user_frames(6))
    b = run(LmGen(tiny_model, GREEDY, GREEDY, seed=99), user_frames(6))
    assert [o.text_token for o in a if o] == [o.text_token for o in b if o]


class GrowingCache:
    """Reference: keeps every key and attends to the last `window` positions (no rotation)."""

    def __init__(self, window):
        self.window, self.keys, self.values = window, [], []

    def update(self, keys, values, ctx):
        self.keys.append(keys)
        self.values.append(values)
        return (mx.concatenate(self.keys[-self.window :], axis=2), mx.concatenate(self.values[-self.window :], axis=2), None)


def test_rotating_window_matches_sliding_attention_past_the_context():
    context = 12
    cfg = config_tiny(context=context)
    mx.random.seed(5)
    model = build_model(cfg, None, mx.float32)
    mx.eval(model.parameters())
    cache = model.make_cache()
    reference = [GrowingCache(context) for _ in range(cfg.transformer.num_layers)]
    rng = np.random.default_rng(0)
    for position in range(3 * context + 5):
        tokens = mx.array(rng.integers(0, 2048, (1, 17)).astype(np.int32))
        _, ours = model.temporal(tokens, cache.layers, cache.context())
        cache.position += 1
        ctx = StepContext.for_position(position, 10**9)  # same rotary position, no window
        _, ref = model.temporal(tokens, reference, ctx)
        np.testing.assert_allclose(np.array(ours), np.array(ref), rtol=1e-4, atol=1e-4)
        assert cache.layers[0].keys.shape[2] == context


def test_long_session_keeps_generating_with_flat_cache(tiny_model):
    cfg = config_tiny(context=16)
    model = build_model(cfg, None, mx.float32)
    model.update(tiny_model.parameters())
    gen = LmGen(model, seed=0)
    nbytes = gen._cache.nbytes
    outs = run(gen, user_frames(60))
    assert sum(o is not None for o in outs) == 59
    assert gen._cache.nbytes == nbytes and gen._cache.position == 60


def test_bad_user_codes(tiny_model):
    gen = LmGen(tiny_model)
    with pytest.raises(ValueError, match="expected 8 user codes"):
        gen.step(np.zeros(7, dtype=np.int32))
    with pytest.raises(ValueError, match="must be in"):
        gen.step(np.full(8, 2048))


def test_sampling_settings_change_between_conversations(tiny_model):
    gen = LmGen(tiny_model, SamplingParams(0.9, 50), SamplingParams(0.9, 50), seed=3)
    run(gen, user_frames(3))
    gen.configure(GREEDY, GREEDY, seed=3)
    gen.reset()
    greedy = run(gen, user_frames(4))
    again = run(LmGen(tiny_model, GREEDY, GREEDY), user_frames(4))
    assert [o.text_token for o in greedy if o] == [o.text_token for o in again if o]


def _raw(gen, frames):
    out = []
    for frame in frames:
        pending = gen.submit(frame)
        out.append(pending.raw_tokens)
        pending.result()
    return np.stack(out)


def test_text_and_audio_seeds_are_separate(tiny_model):
    frames = user_frames(6)
    a = _raw(LmGen(tiny_model, text_seed=1, audio_seed=2), frames)
    assert np.array_equal(a, _raw(LmGen(tiny_model, text_seed=1, audio_seed=2), frames))  # a pair replays
    b = _raw(LmGen(tiny_model, text_seed=1, audio_seed=3), frames)
    assert a[0, 0] == b[0, 0]  # step 0's text is drawn before any audio: same text seed, same token
    assert not np.array_equal(a[:, 1:], b[:, 1:])
    # `seed` is the convenience for both; a stream's own seed wins.
    c = _raw(LmGen(tiny_model, seed=9, text_seed=1, audio_seed=2), frames)
    assert np.array_equal(a, c)
    gen = LmGen(tiny_model, seed=4)
    assert (gen.text_seed, gen.audio_seed) == (4, 4)


def _repeats_within(tokens, context):
    """Word tokens (not padding 0 / 3) that reappear within `context` tokens."""
    return [t for t in range(1, len(tokens)) if tokens[t] not in (0, 3) and tokens[t] in tokens[max(0, t - context) : t]]


def test_repetition_penalty_keeps_greedy_text_from_repeating(tiny_model):
    frames = user_frames(24)
    plain = _raw(LmGen(tiny_model, GREEDY, GREEDY), frames)[:, 0].tolist()
    assert _repeats_within(plain, 8)  # the tiny random model repeats itself
    controls = TextControls(repetition_penalty=100.0, repetition_penalty_context=8)  # the bound: strongest allowed
    penalised = _raw(LmGen(tiny_model, GREEDY, GREEDY, text_controls=controls), frames)[:, 0].tolist()
    assert _repeats_within(penalised, 8) == [], penalised
    assert penalised[0] == plain[0]  # nothing to penalise at the first step
