import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moshi_mlx.model_files.checkpoint import Quantization, build_model
from moshi_mlx.models.cache import StepContext
from moshi_mlx.models.config import config_tiny
from moshi_mlx.models.lm import NO_TOKEN, embed


@pytest.mark.parametrize(
    "dtype,quant",
    [(mx.float32, None), (mx.bfloat16, None), (mx.bfloat16, Quantization(8, 64)), (mx.bfloat16, Quantization(4, 32))],
)
def test_missing_tokens_embed_to_zero_in_every_dtype(dtype, quant):
    table = nn.Embedding(2049, 64)
    table.weight = mx.random.normal(table.weight.shape) + 1.0  # no row is near zero
    table.set_dtype(dtype)
    if quant:
        nn.quantize(table, group_size=quant.group_size, bits=quant.bits)
    out = embed(table, mx.array([[NO_TOKEN, 5, NO_TOKEN, 2048]]))
    assert np.all(np.array(out[0, 0].astype(mx.float32)) == 0)
    assert np.all(np.array(out[0, 2].astype(mx.float32)) == 0)
    assert np.abs(np.array(out[0, 1].astype(mx.float32))).sum() > 0
    assert np.abs(np.array(out[0, 3].astype(mx.float32))).sum() > 0


def test_temporal_step_shapes():
    cfg = config_tiny()
    model = build_model(cfg, None, mx.float32)
    cache = model.make_cache()
    tokens = mx.full((1, 1 + cfg.audio_codebooks), NO_TOKEN, dtype=mx.int32)
    hidden, logits = model.temporal(tokens, cache.layers, cache.context())
    assert hidden.shape == (1, 1, cfg.transformer.d_model)
    assert logits.shape == (1, cfg.text_out_vocab_size)


def test_step_context_buckets_and_window():
    ctx = StepContext.for_position(0, 3000)
    assert ctx.mask.shape[-1] == 256 and int(ctx.mask.sum()) == 1
    ctx = StepContext.for_position(2999, 3000)
    assert ctx.mask.shape[-1] == 3000 and bool(ctx.mask.all())
    ctx = StepContext.for_position(123_456, 3000)
    assert int(ctx.slot[0]) == 123_456 % 3000 and bool(ctx.mask.all())


def _stepped(model, frames, sampling, keep=True):
    """Step LmGen; returns the delayed token sequence [1, 17, T] and the per-step text logits."""
    from moshi_mlx.generate import LmGen

    cfg = model.config
    gen = LmGen(model, sampling, sampling, seed=3, keep_text_logits=keep)
    raw, logits = [], []
    for frame in frames:
        pending = gen.submit(frame)
        raw.append(pending.raw_tokens)
        logits.append(pending.text_logits)
        pending.result()
    steps = len(frames)
    user = np.zeros((cfg.user_codebooks, steps), np.int32)  # delayed layout; before a delay: anything
    for k, delay in enumerate(cfg.audio_delays[cfg.generated_codebooks :]):
        user[k, delay:] = frames[: steps - delay, k]
    tokens = np.concatenate([np.stack(raw, axis=1), user], axis=0)[None]
    return tokens, np.stack(logits)


@pytest.fixture(scope="module")
def tiny_f32():
    mx.random.seed(4)
    model = build_model(config_tiny(context=6), None, mx.float32)  # context < T: the window matters too
    mx.eval(model.parameters())
    return model


def test_teacher_forced_forward_equals_stepping(tiny_f32):
    from moshi_mlx.settings import SamplingParams

    frames = np.random.default_rng(1).integers(0, 2048, (10, 8)).astype(np.int32)
    tokens, stepped_logits = _stepped(tiny_f32, frames, SamplingParams(0.9, 40))
    text_logits, audio_logits = tiny_f32.forward(mx.array(tokens))
    assert text_logits.shape == (1, 10, 32000) and audio_logits.shape == (1, 8, 10, 2048)
    np.testing.assert_allclose(np.array(text_logits[0]), stepped_logits, rtol=0, atol=1e-4)


def test_teacher_forced_audio_logits_pick_the_greedy_codes(tiny_f32):
    from moshi_mlx.settings import GREEDY

    frames = np.random.default_rng(2).integers(0, 2048, (8, 8)).astype(np.int32)
    tokens, _ = _stepped(tiny_f32, frames, GREEDY)
    _, audio_logits = tiny_f32.forward(mx.array(tokens))
    # The depformer fed the given tokens reproduces every greedy choice of stepping.
    assert np.array_equal(np.array(mx.argmax(audio_logits[0], axis=-1)), tokens[0, 1:9])


def test_text_logits_are_not_kept_unless_asked(tiny_f32):
    from moshi_mlx.generate import LmGen

    pending = LmGen(tiny_f32, seed=0).submit(np.zeros(8, np.int32))
    assert pending.text_logits is None and pending._text_logits is None
    pending.result()


def test_forward_rejects_the_wrong_number_of_streams(tiny_f32):
    with pytest.raises(ValueError, match="expected 17 streams"):
        tiny_f32.forward(mx.zeros((1, 9, 4), dtype=mx.int32))
