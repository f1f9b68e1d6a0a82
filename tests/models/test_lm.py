import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moshi_mlx.loading import Quantization, build_model
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
