"""A model's condition, guidance and default sampling, read from its config (no weights: configs only)."""

from __future__ import annotations

import pytest

from moshi_mlx.conditioning import (
    ConditioningError,
    check_conditioning,
    conditions_for,
    default_condition,
    model_kind,
    model_settings,
)
from moshi_mlx.model_files.stand_ins import tiny_hibiki_config
from moshi_mlx.models.config import LmConfig, config_tiny
from moshi_mlx.settings import KNOBS, lm_gen_knobs

HIBIKI = LmConfig.from_dict(tiny_hibiki_config())
MOSHI = config_tiny()


def test_hibiki_runs_very_good_and_guidance_adds_very_bad():
    assert HIBIKI.is_conditioned and default_condition(HIBIKI) == "very_good"
    assert conditions_for(HIBIKI, None, 1.0) == [{"description": "very_good"}]
    assert conditions_for(HIBIKI, "good", 3.0) == [{"description": "good"}, {"description": "very_bad"}]
    assert conditions_for(MOSHI, None, 1.0) == [] and default_condition(MOSHI) is None
    assert model_kind(HIBIKI) == "translation model" and model_kind(MOSHI) == "conversation model"


@pytest.mark.parametrize(
    "config,condition,coef,message",
    [
        (MOSHI, "very_good", None, "condition 'very_good': this model has no conditioners"),
        (MOSHI, None, 3.0, "cfg_coef 3: classifier-free guidance needs a model with conditioners"),
        (HIBIKI, "splendid", None,
         "condition 'splendid' is not one of description's values: very_bad, bad, neutral, good, very_good"),
    ],
)
def test_what_a_model_cannot_take_is_one_line(config, condition, coef, message):
    with pytest.raises(ConditioningError) as e:
        check_conditioning(config, condition, coef)
    assert str(e.value) == message


def test_guidance_off_and_the_default_pass_everywhere():
    for config in (MOSHI, HIBIKI):
        check_conditioning(config, None, None)
        check_conditioning(config, None, 1.0)
    check_conditioning(HIBIKI, "very_bad", 0.5)


def test_lm_gen_config_sets_the_models_defaults_and_flags_win():
    config = {"temp": 0.6, "temp_text": 0.5, "top_k": 100, "top_k_text": 10, "cfg_coef": 2.0, "check": False}
    assert lm_gen_knobs(config) == {"audio_temperature": 0.6, "text_temperature": 0.5, "audio_topk": 100,
                                    "text_topk": 10, "cfg_coef": 2.0}
    assert lm_gen_knobs({"use_sampling": False}) == {"text_temperature": 0.0, "audio_temperature": 0.0}
    hibiki = LmConfig.from_dict({**tiny_hibiki_config(), "lm_gen_config": config})
    settings = model_settings(hibiki, {"text_topk": 3}, kv_bits=8)
    assert (settings.audio.temperature, settings.text.temperature, settings.audio.top_k) == (0.6, 0.5, 100)
    assert (settings.text.top_k, settings.cfg_coef, settings.kv_bits) == (3, 2.0, 8)  # the flag beats the model
    plain = model_settings(MOSHI, {})
    assert plain.text.top_k == KNOBS["text_topk"].default and plain.cfg_coef == 1.0


def test_a_bad_lm_gen_config_value_is_one_line():
    hibiki = LmConfig.from_dict({**tiny_hibiki_config(), "lm_gen_config": {"temp": -1}})
    with pytest.raises(ConditioningError, match=r"^config.json lm_gen_config: audio_temperature must be >= 0"):
        model_settings(hibiki, {})
