import json

import pytest

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
