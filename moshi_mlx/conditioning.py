"""What a model's config.json says about generating with it: its condition, guidance and default sampling.

A conditioned model (Hibiki: one `description` look-up table of very_bad ... very_good) generates under a
condition; classifier-free guidance (cfg_coef C != 1) also runs the `very_bad` condition and mixes the two,
as Kyutai's PyTorch `LMGen` and hibiki-rs do. Every front end checks its flags or query here, against the
parsed config, before a weight loads; `LmGen` checks again, so no path skips it.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import MoshiError
from .models.config import LmConfig
from .settings import EngineSettings, lm_gen_knobs, with_knobs

#: The condition Kyutai's Hibiki runs under (its run_inference and server hard-code it), and CFG's negative.
DEFAULT_CONDITION = "very_good"
NEGATIVE_CONDITION = "very_bad"
#: How the UI and messages name a model, by config.json's `model_type`.
MODEL_KINDS = {"hibiki": "translation model", "moshi": "conversation model", "stt": "speech-to-text model"}


class ConditioningError(MoshiError, ValueError):
    """A condition or guidance the model cannot take; one line for the user."""


def conditioner_values(config: LmConfig) -> dict[str, tuple[str, ...]]:
    """Each conditioner's name and the values it takes (empty for an unconditioned model)."""
    return {c.name: tuple(c.possible_values or ()) for c in getattr(config, "conditioners", ())}


def model_kind(config: LmConfig) -> str:
    """A few words for the UI: "translation model" for Hibiki, "conversation model" for Moshi."""
    model_type = str(getattr(config, "model_type", None) or "moshi")
    return MODEL_KINDS.get(model_type, f"{model_type} model")


def _the_conditioner(config: LmConfig) -> tuple[str, tuple[str, ...]] | None:
    table = conditioner_values(config)
    if not table:
        return None
    if len(table) > 1:
        raise ConditioningError(f"this model has {len(table)} conditioners ({', '.join(table)}); only one is supported")
    return next(iter(table.items()))


def default_condition(config: LmConfig) -> str | None:
    """The condition a conditioned model runs under when none is asked for (None: unconditioned)."""
    found = _the_conditioner(config)
    if found is None:
        return None
    name, values = found
    if DEFAULT_CONDITION not in values:
        raise ConditioningError(
            f"conditioner {name} has no {DEFAULT_CONDITION} value ({', '.join(values)}): choose a condition"
        )
    return DEFAULT_CONDITION


def check_conditioning(config: LmConfig, condition: str | None, cfg_coef: float | None) -> None:
    """ConditioningError (one line) unless the model can run under `condition` with guidance `cfg_coef`."""
    found = _the_conditioner(config)
    guided = cfg_coef is not None and cfg_coef != 1.0
    if found is None:
        if condition is not None:
            raise ConditioningError(f"condition {condition!r}: this model has no conditioners")
        if guided:
            raise ConditioningError(f"cfg_coef {cfg_coef:g}: classifier-free guidance needs a model with conditioners")
        return
    name, values = found
    if condition is not None and condition not in values:
        raise ConditioningError(f"condition {condition!r} is not one of {name}'s values: {', '.join(values)}")
    if guided and NEGATIVE_CONDITION not in values:
        raise ConditioningError(f"cfg_coef needs a {NEGATIVE_CONDITION} value of {name}, which has {', '.join(values)}")


def conditions_for(config: LmConfig, condition: str | None, cfg_coef: float) -> list[dict[str, str]]:
    """The condition of each batch row the step runs: the chosen one, then `very_bad` when guided (C != 1).

    Empty for an unconditioned model.
    """
    check_conditioning(config, condition, cfg_coef)
    found = _the_conditioner(config)
    if found is None:
        return []
    name, _ = found
    rows = [{name: condition or default_condition(config)}]
    if cfg_coef != 1.0:
        rows.append({name: NEGATIVE_CONDITION})
    return rows


def model_defaults(config: LmConfig | None) -> dict[str, Any]:
    """The knob values the model's config.json sets (`lm_gen_config`); a bad one is a one-line error."""
    try:
        return lm_gen_knobs(getattr(config, "lm_gen_config", None)) if config is not None else {}
    except ValueError as e:
        raise ConditioningError(f"config.json lm_gen_config: {e}") from None


def model_settings(config: LmConfig | None, given: Mapping[str, Any], **fields: Any) -> EngineSettings:
    """The table's defaults, then the model's `lm_gen_config`, then what the user gave (flags, query)."""
    return with_knobs(EngineSettings(**fields), {**model_defaults(config), **given})
