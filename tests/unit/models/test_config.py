import json

import pytest

from moshi_mlx.errors import MoshiError
from moshi_mlx.models.config import ConfigError, LmConfig, config_v0_1, preset


def test_7b_derived_sizes():
    cfg = config_v0_1()
    assert cfg.transformer.hidden_dim == 11264
    assert cfg.depformer.hidden_dim == 2816
    assert cfg.user_codebooks == 8 and cfg.max_delay == 1 and cfg.audio_card == 2048


def test_from_dict_round_trips_and_refuses_unknown_keys():
    cfg = preset("small")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert LmConfig.from_dict(data) == cfg
    with pytest.raises(ConfigError, match="'something_new' is not known"):
        LmConfig.from_dict({**data, "something_new": 1})
    data["transformer"]["unknown"] = "x"
    with pytest.raises(ConfigError, match="transformer.'unknown'"):
        LmConfig.from_dict(data)


def test_kyutai_config_json_round_trip():
    cfg = config_v0_1()
    data = cfg.to_kyutai_dict()
    data.update({"moshi_name": "model.safetensors", "mimi_name": "m.safetensors", "lm_gen_config": {}})
    back = LmConfig.from_dict(data)
    assert back.transformer.hidden_dim == cfg.transformer.hidden_dim
    assert back.depformer.hidden_dim == cfg.depformer.hidden_dim
    assert back.audio_delays == cfg.audio_delays
    assert back.text_in_vocab_size == 32001 and back.audio_vocab_size == 2049


def test_pytorch_style_feedforward_sizes():
    # Kyutai's PyTorch kwargs give the depformer 4224 (= 4.125 * 1024): gated hidden 2816 as well.
    data = config_v0_1().to_kyutai_dict() | {"depformer_dim_feedforward": 4224}
    assert LmConfig.from_dict(data).depformer.hidden_dim == 2816


def test_bad_configs_are_clear():
    with pytest.raises(ConfigError, match="lacks the required key num_layers"):
        LmConfig.from_dict({"dim": 16})
    with pytest.raises(ValueError, match="unknown model config"):
        preset("huge")


# ---------------------------------------------------------------------------------------------------------
# Kyutai's config.json: published configs, LMModel's defaults, inheritance, refusals

#: kyutai-labs/moshi configs/moshi_7b_202409.json (the published 7B's keys, as facts).
MOSHI_7B = {
    "dim": 4096, "text_card": 32000, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 2048,
    "num_heads": 32, "num_layers": 32, "hidden_scale": 4.125, "causal": True, "layer_scale": None, "context": 3000,
    "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_dim": 1024, "depformer_dim_feedforward": 4224, "depformer_num_heads": 16, "depformer_num_layers": 6,
    "depformer_causal": True, "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": 8,
    "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
    "depformer_weights_per_step": True, "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}
#: kyutai-labs/moshi configs/moshi_mlx_2b.json (Hibiki 2B): 32 streams, delays of 2, a summed condition.
HIBIKI_2B = {
    **MOSHI_7B, "dim": 2560, "text_card": 48000, "n_q": 32, "dep_q": 16, "num_heads": 20, "num_layers": 24,
    "max_period": 100000, "depformer_context": 16, "delays": [0, 0] + [2] * 15 + [0] + [2] * 15,
    "conditioners": {"description": {"type": "lut", "lut": {
        "n_bins": 31, "dim": 16, "tokenizer": "noop",
        "possible_values": ["very_bad", "bad", "neutral", "good", "very_good"]}}},
    "fuser": {"sum": ["description"]},
}
#: The fewest keys LMModel accepts (num_layers and a delay per stream; the depformer's heads; a context to stream).
MINIMAL = {"num_layers": 2, "delays": [0] * 9, "depformer_num_heads": 4, "context": 10}


def test_published_7b_config_reads_as_config_v0_1():
    assert LmConfig.from_dict(MOSHI_7B) == config_v0_1()
    assert LmConfig.from_dict(config_v0_1().to_kyutai_dict()) == config_v0_1()


def test_published_hibiki_2b_config_reads_every_option():
    cfg = LmConfig.from_dict({**HIBIKI_2B, "model_type": "hibiki", "mimi_name": "mimi.safetensors",
                              "lm_gen_config": {"temp": 0.8, "cfg_coef": 3.0}})
    assert (cfg.audio_codebooks, cfg.generated_codebooks, cfg.user_codebooks, cfg.mimi_codebooks) == (32, 16, 16, 16)
    assert config_v0_1().mimi_codebooks == 8
    assert cfg.audio_delays == (0,) + (2,) * 15 + (0,) + (2,) * 15 and cfg.max_delay == 2
    assert cfg.transformer.max_period == 100000 and cfg.transformer.hidden_dim == 11 * 2560 // 4
    assert cfg.depformer.hidden_dim == 2816 and cfg.depformer.context == 16
    assert cfg.is_conditioned and cfg.conditioner_names == ("description",)
    assert cfg.conditioners[0].possible_values[-1] == "very_good" and cfg.conditioners[0].n_bins == 31
    assert (cfg.model_type, cfg.mimi_name, dict(cfg.lm_gen_config)) == ("hibiki", "mimi.safetensors",
                                                                       {"temp": 0.8, "cfg_coef": 3.0})
    assert LmConfig.from_dict(cfg.to_kyutai_dict()) == cfg


def test_left_out_keys_take_lmmodels_defaults():
    cfg = LmConfig.from_dict(MINIMAL)
    t, d = cfg.transformer, cfg.depformer
    assert (t.norm, t.norm_eps, t.positional_embedding, t.gating) == ("layer_norm", 1e-5, "sin", False)
    assert (t.d_model, t.num_heads, t.hidden_dim) == (128, 8, 4 * 128)  # hidden_scale 4, plain MLP
    assert (d.d_model, d.positional_embedding, d.gating, d.num_layers) == (256, "sin", False, 2)
    assert (cfg.audio_codebooks, cfg.generated_codebooks, cfg.audio_card, cfg.text_out_vocab_size) == (8, 8, 1024, 32000)
    assert cfg.model_type == "moshi" and cfg.mimi_name is None and dict(cfg.lm_gen_config) == {}
    assert not cfg.is_conditioned and cfg.extra_heads_num_heads == 0


def test_gated_hidden_size_follows_kyutais_rule():
    """Kyutai's gating: 21 d / 8 for a 4 d feed-forward (hidden_scale 4), else 2/3 of it (4.125: 11 d / 4)."""
    four = LmConfig.from_dict({**MINIMAL, "gating": "silu"})
    assert four.transformer.hidden_dim == 21 * 128 // 8 and four.depformer.hidden_dim == 21 * 256 // 8
    moshi = LmConfig.from_dict({**MINIMAL, "gating": "silu", "hidden_scale": 4.125, "depformer_dim_feedforward": 999})
    assert moshi.transformer.hidden_dim == 2 * int(4.125 * 128) // 3 == 11 * 128 // 4
    assert moshi.depformer.hidden_dim == 2 * 999 // 3
    assert LmConfig.from_dict(four.to_kyutai_dict()) == four and LmConfig.from_dict(moshi.to_kyutai_dict()) == moshi


def test_depformer_inherits_unprefixed_keys_unless_overridden():
    base = {**MINIMAL, "gating": "silu", "max_period": 500, "kv_repeat": 2, "layer_scale": 0.1, "positional_scale": 0.5}
    cfg = LmConfig.from_dict(base)
    d = cfg.depformer
    assert (d.gating, d.max_period, d.kv_repeat, d.layer_scale, d.positional_scale) == (True, 500, 2, True, 0.5)
    over = LmConfig.from_dict({**base, "depformer_gating": "none", "depformer_max_period": 7, "depformer_kv_repeat": 1,
                               "depformer_layer_scale": None, "depformer_positional_scale": 1.0,
                               "depformer_num_layers": 3, "depformer_context": 2})
    d = over.depformer
    assert (d.gating, d.max_period, d.kv_repeat, d.layer_scale, d.positional_scale, d.num_layers) == (
        False, 7, 1, False, 1.0, 3)
    assert d.context == over.generated_codebooks  # Kyutai forces the depformer's context to None: the whole frame
    assert over.transformer.kv_repeat == 2 and over.transformer.layer_scale


def test_description_keys_are_kept_not_refused():
    cfg = LmConfig.from_dict({**MOSHI_7B, "moshi_name": "m.safetensors", "tokenizer_name": "t.model", "model_id": {},
                              "lora": False, "lora_rank": 128, "lora_scaling": 2.0, "lora_name": None,
                              "stt_config": {}, "tts_config": {}, "mimi_config_name": None, "cross_attention": False,
                              "demux_second_stream": False, "conditioners": {}, "fuser": None})
    assert cfg == config_v0_1()


REFUSALS = [
    ({"cross_attention": True}, "cross_attention=True"),
    ({"demux_second_stream": True}, "demux_second_stream=True"),
    ({"norm_emb": True}, "norm_emb=True"),
    ({"bias_proj": True}, "bias_proj=True"),
    ({"causal": False}, "causal=False"),
    ({"quantize": True}, "quantize=True"),
    ({"text_card_out": 100}, "text_card_out=100"),
    ({"context": None}, "key context is null"),
    ({"norm": "batch_norm"}, "norm='batch_norm'"),
    ({"depformer_norm": "group_norm"}, "depformer_norm='group_norm'"),
    ({"gating": "relu"}, "gating='relu'"),
    ({"depformer_gating": "gelu"}, "depformer_gating='gelu'"),
    ({"positional_embedding": "alibi"}, "positional_embedding='alibi'"),
    ({"depformer_pos_emb": "learnt"}, "depformer_pos_emb='learnt'"),
    ({"depformer_dim_feedforward": [100, 200]}, "depformer_dim_feedforward"),
    ({"mystery_knob": 1}, "'mystery_knob' is not known"),
    ({"depformer_mystery": 1}, "'depformer_mystery' is not known"),
    ({"fuser": {"sum": [], "prepend": ["description"]}, "conditioners": {}}, "fuser.prepend"),
    ({"fuser": {"cross": ["description"]}, "conditioners": {}}, "fuser.cross"),
    ({"conditioners": {"speaker": {"type": "tensor", "tensor": {"dim": 8}}}, "fuser": {"sum": ["speaker"]}},
     "conditioners.speaker.type='tensor'"),
    ({"conditioners": {"d": {"type": "lut", "lut": {"n_bins": 3, "dim": 4, "tokenizer": "whitespace"}}},
      "fuser": {"sum": ["d"]}}, "conditioners.d.lut.tokenizer"),
    ({"conditioners": {"d": {"type": "lut", "lut": {"n_bins": 3, "dim": 4, "tokenizer": "noop"}}}},
     "conditioners.d is not fused"),
    ({"fuser": {"sum": ["nobody"]}}, "fuser.sum names 'nobody'"),
    ({"kv_repeat": 3}, "kv_repeat 3 does not divide"),
    ({"delays": [0, -1] + [1] * 15}, "expected non-negative integers"),
]


@pytest.mark.parametrize("extra,words", REFUSALS, ids=[w for _, w in REFUSALS])
def test_every_unsupported_key_is_refused_in_one_line_naming_it(extra, words):
    with pytest.raises(ConfigError) as e:
        LmConfig.from_dict({**MOSHI_7B, **extra})
    assert words in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, MoshiError)


def test_nested_form_refuses_what_it_cannot_run():
    data = json.loads(json.dumps(config_v0_1().to_dict()))
    for key, value in (("cross_attention", True), ("bias_attn", True), ("norm_first", False), ("use_conv_block", True)):
        bad = json.loads(json.dumps(data))
        bad["depformer"][key] = value
        with pytest.raises(ConfigError, match=f"depformer.{key}="):
            LmConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="demux_second_stream=True"):
        LmConfig.from_dict({**data, "demux_second_stream": True})


def test_kyutai_mlx_nested_config_of_the_published_7b_reads_as_config_v0_1(manifests_dir):
    """moshi_mlx 0.3.0's own LmConfig (asdict), as recorded with the published MLX 7B, is our 7B."""
    nested = json.loads((manifests_dir / "moshi-7b-mlx-bf16.json").read_text())["config"]
    assert LmConfig.from_dict(nested) == config_v0_1()
