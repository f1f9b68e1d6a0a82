"""What a conversation's sampling is set to: plain dataclasses, no MLX.

The wire protocol, the command line and the engine all speak these, so parsing a client's query
or a flag never needs the model's framework. :data:`KNOBS` is the one table of the sampling
knobs: every flag, query parameter, metadata field and web form derives from it, so their names,
bounds, defaults and error messages cannot drift apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

Number = float | int


def _show(x: Number) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Bounds:
    """A closed range, or half-open at the bottom (open_low: the low end itself is refused)."""

    low: Number
    high: Number
    open_low: bool = False

    def __contains__(self, value: Number) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and value <= self.high  # NaN compares false: refused

    def describe(self) -> str:
        return f"{'>' if self.open_low else '>='} {_show(self.low)} and <= {_show(self.high)}"

    def check(self, name: str, value: Number, shown: str | None = None) -> None:
        """ValueError, in the words every front end prints, unless `value` is in range."""
        if value not in self:
            got = shown if shown is not None else repr(value)
            raise ValueError(f"{name} must be {self.describe()}, got {got}")


# The server's bounds: generous, but they keep a client from sending values the sampler cannot use.
TEMPERATURE = Bounds(0.0, 100.0)
TOP_K = Bounds(0, 1_000_000)
TOP_P = Bounds(0.0, 1.0, open_low=True)  # 1 = off; 0 would keep nothing
MIN_P = Bounds(0.0, 1.0)  # 0 = off; 1 keeps only the likeliest token(s)
PENALTY = Bounds(0.0, 100.0, open_low=True)
PENALTY_CONTEXT = Bounds(0, 100_000)
PAD_MULT = Bounds(-100.0, 100.0)
SEED = Bounds(0, 2**63 - 1)
CFG_COEF = Bounds(0.0, 100.0)  # 1 = no guidance; Hibiki's README suggests 3 for voice transfer
#: What a condition value may look like (the models' own lists, e.g. very_bad ... very_good, are checked at load).
CONDITION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def check_condition_name(name: str, value: object) -> None:
    if not isinstance(value, str) or not CONDITION_NAME.fullmatch(value):
        raise ValueError(f"{name} must be a condition name such as very_good, got {value!r}")


@dataclass(frozen=True)
class Knob:
    """One sampling setting: `name` is the WebSocket query parameter and, dashed, the flag."""

    name: str
    field: str  # where it lives in EngineSettings: "text.temperature", "seed", ...
    kind: str  # "float", "int", "seed" (an int whose default None means random) or "name" (a word)
    bounds: Bounds | None  # None for a name
    default: Number | str | None
    label: str  # a few words for forms
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, raw: str) -> Number | str:
        """The value a flag or query parameter spells, or ValueError with the message users see."""
        if self.bounds is None:
            check_condition_name(self.name, raw.strip())
            return raw.strip()
        value = _parse_float(self.name, raw) if self.kind == "float" else _parse_int(self.name, raw)
        self.bounds.check(self.name, value, repr(raw))
        return value

    def cast(self, value: Any) -> Number | str | None:
        """`value` as this knob's JSON type (None stays None: a seed left random, the model's condition)."""
        if value is None:
            return None
        return {"float": float, "name": str}.get(self.kind, int)(value)

    def read(self, settings: EngineSettings) -> Any:
        value: Any = settings
        for attr in self.field.split("."):
            value = getattr(value, attr)
        return value

    def as_json(self) -> dict[str, Any]:
        """What a web form needs to check and explain the field."""
        b = self.bounds
        limits = {"low": b.low, "high": b.high, "open_low": b.open_low} if b else {"low": None, "high": None, "open_low": False}
        return {"name": self.name, "kind": self.kind, **limits, "default": self.default, "label": self.label,
                "help": self.help}


def _parse_float(name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {raw!r}")
    return value


def _parse_int(name: str, raw: str) -> int:
    text = raw.strip()
    try:
        return int(text)
    except ValueError:
        pass
    # Accept "25.0" (some clients format every number as a float), nothing fractional.
    try:
        as_float = float(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise ValueError(f"{name} must be an integer, got {raw!r}")
    return int(as_float)


def _knobs(*knobs: Knob) -> dict[str, Knob]:
    return {k.name: k for k in knobs}


#: The sampling knobs, in the order flags and forms list them.
KNOBS: dict[str, Knob] = _knobs(
    Knob("text_temperature", "text.temperature", "float", TEMPERATURE, 0.7, "Text temperature",
         "text sampling temperature, 0 = greedy"),
    Knob("text_topk", "text.top_k", "int", TOP_K, 25, "Text top-k",
         "sample among the K likeliest text tokens, 0 = all"),
    Knob("text_top_p", "text.top_p", "float", TOP_P, 1.0, "Text top-p",
         "sample among the likeliest text tokens whose probabilities sum to P, 1 = all"),
    Knob("text_min_p", "text.min_p", "float", MIN_P, 0.0, "Text min-p",
         "drop text tokens less likely than P times the likeliest one, 0 = none"),
    Knob("audio_temperature", "audio.temperature", "float", TEMPERATURE, 0.8, "Audio temperature",
         "audio sampling temperature, 0 = greedy"),
    Knob("audio_topk", "audio.top_k", "int", TOP_K, 250, "Audio top-k",
         "sample among the K likeliest audio codes, 0 = all"),
    Knob("audio_top_p", "audio.top_p", "float", TOP_P, 1.0, "Audio top-p",
         "sample among the likeliest audio codes whose probabilities sum to P, 1 = all"),
    Knob("audio_min_p", "audio.min_p", "float", MIN_P, 0.0, "Audio min-p",
         "drop audio codes less likely than P times the likeliest one, 0 = none"),
    Knob("repetition_penalty", "text_controls.repetition_penalty", "float", PENALTY, 1.0, "Repetition penalty",
         "penalise text tokens Moshi used recently (> 1 penalises, 1 = off)"),
    Knob("repetition_penalty_context", "text_controls.repetition_penalty_context", "int", PENALTY_CONTEXT, 64,
         "Repetition penalty context", "how many recent text tokens (not padding) the penalty looks at"),
    Knob("pad_mult", "text_controls.pad_mult", "float", PAD_MULT, 0.0, "Padding multiplier",
         "multiply the text padding probability by exp(this); negative: Moshi talks more"),
    Knob("seed", "seed", "seed", SEED, None, "Seed", "seed for reproducible sampling (both streams)"),
    Knob("text_seed", "text_seed", "seed", SEED, None, "Text seed", "seed of the text stream (overrides --seed)"),
    Knob("audio_seed", "audio_seed", "seed", SEED, None, "Audio seed", "seed of the audio stream (overrides --seed)"),
    Knob("cfg_coef", "cfg_coef", "float", CFG_COEF, 1.0, "Guidance (CFG)",
         "classifier-free guidance for a conditioned model such as Hibiki: C*good - (C-1)*very_bad logits, "
         "1 = off (twice the work otherwise); Hibiki suggests 3"),
    Knob("condition", "condition", "name", None, None, "Condition",
         "the condition of a conditioned model such as Hibiki (default: the model's, very_good for Hibiki)"),
)
#: The knobs that only a model with conditioners takes (the web form shows them only for such a model).
CONDITIONING_KNOBS = ("cfg_coef", "condition")


def knob_table(text_only: bool = False) -> list[dict[str, Any]]:
    """KNOBS as JSON, for clients that build their own forms (the web UI); for a text-only model, only the
    knobs that change its captions (:data:`TEXT_ONLY_KNOBS`)."""
    return [k.as_json() for k in KNOBS.values() if not text_only or k.name in TEXT_ONLY_KNOBS]


def knob_values(settings: EngineSettings) -> dict[str, Any]:
    """Every knob's value in `settings`, by name (seeds as set, not as in effect)."""
    return {k.name: k.read(settings) for k in KNOBS.values()}


def with_knobs(settings: EngineSettings, values: Mapping[str, Any]) -> EngineSettings:
    """`settings` with the named knobs set (None is a value: a seed left random)."""
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for name, value in values.items():
        head, _, attr = KNOBS[name].field.partition(".")
        if attr:
            nested.setdefault(head, {})[attr] = value
        else:
            top[head] = value
    for head, changes in nested.items():  # one replace per group: each validates once, whole
        top[head] = replace(getattr(settings, head), **changes)
    return replace(settings, **top)


@dataclass(frozen=True)
class SamplingParams:
    """One stream's sampling: temperature, then the top-k, top-p (nucleus) and min-p filters in that order.

    top_p keeps the likeliest tokens until their probabilities (after temperature and top-k) sum to
    at least `top_p`; min_p keeps the tokens at least `min_p` times as likely as the likeliest one.
    Temperature 0 is greedy and ignores the filters.
    """

    temperature: float = 0.8
    top_k: int = 250
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        TEMPERATURE.check("temperature", self.temperature)
        TOP_K.check("top_k", self.top_k)
        TOP_P.check("top_p", self.top_p)
        MIN_P.check("min_p", self.min_p)


def _stream_defaults(stream: str) -> SamplingParams:
    return SamplingParams(*(KNOBS[f"{stream}_{name}"].default for name in ("temperature", "topk", "top_p", "min_p")))


DEFAULT_TEXT_SAMPLING = _stream_defaults("text")
DEFAULT_AUDIO_SAMPLING = _stream_defaults("audio")
GREEDY = SamplingParams(temperature=0.0, top_k=0)

#: The knobs that still change a text-only (speech-to-text) model's captions. Captions are read greedily, as
#: Kyutai's STT configs (temp_text 0) and scripts run these models, and no audio is sampled: the temperatures,
#: top-k/p, min-p and seeds do nothing; the repetition penalty and pad_mult act on the logits before the argmax.
TEXT_ONLY_KNOBS = ("repetition_penalty", "repetition_penalty_context", "pad_mult")
#: Why the other knobs are ignored for such a model (said per knob in the web info message's ignored_params).
TEXT_ONLY_NOTE = "a speech-to-text model reads its captions greedily: sampling and seeds have no effect"


@dataclass(frozen=True)
class TextControls:
    """Kyutai's production-server controls over the text stream (defaults leave sampling unchanged).

    repetition_penalty: over the last `repetition_penalty_context` text tokens that are not padding,
    end-of-padding or start tokens, each distinct token's logit is divided by the penalty if positive
    and multiplied by it if negative (1.0: off).
    pad_mult: the padding token's sampling probability is multiplied by exp(pad_mult), i.e. pad_mult is
    added to its tempered logit (negative values make Moshi talk more; 0: off).
    """

    repetition_penalty: float = 1.0
    repetition_penalty_context: int = 64
    pad_mult: float = 0.0

    def __post_init__(self) -> None:
        PENALTY.check("repetition_penalty", self.repetition_penalty)
        PENALTY_CONTEXT.check("repetition_penalty_context", self.repetition_penalty_context)
        PAD_MULT.check("pad_mult", self.pad_mult)

    @property
    def penalises(self) -> bool:
        return self.repetition_penalty != 1.0 and self.repetition_penalty_context > 0


DEFAULT_TEXT_CONTROLS = TextControls(
    KNOBS["repetition_penalty"].default, KNOBS["repetition_penalty_context"].default, KNOBS["pad_mult"].default
)


@dataclass(frozen=True)
class EngineSettings:
    """Sampling settings. `seed` is a convenience that seeds both streams; `text_seed` and
    `audio_seed`, when given, take precedence for their stream."""

    text: SamplingParams = DEFAULT_TEXT_SAMPLING
    audio: SamplingParams = DEFAULT_AUDIO_SAMPLING
    seed: int | None = None
    text_controls: TextControls = DEFAULT_TEXT_CONTROLS
    text_seed: int | None = None
    audio_seed: int | None = None
    kv_bits: int | None = None  # LM key/value precision 16/8/4; None: the memory plan's, else the default (8)
    context: int | None = None  # LM attention window; None = the checkpoint's
    cfg_coef: float = 1.0  # classifier-free guidance (a conditioned model only); 1 = off
    condition: str | None = None  # a conditioned model's condition; None = the model's default
    # A persona model's system prompt (moshi_mlx.persona), played at each conversation's start: the role text
    # (wrapped in <system> tags) and a voice (a preset NAME in the voices folder, or a PATH to audio / a preset).
    text_prompt: str | None = None
    voice: str | None = None

    @property
    def has_prompt(self) -> bool:
        return bool(self.text_prompt and self.text_prompt.strip()) or bool(self.voice and self.voice.strip())

    def __post_init__(self) -> None:
        for name in ("seed", "text_seed", "audio_seed"):
            if getattr(self, name) is not None:
                SEED.check(name, getattr(self, name))
        CFG_COEF.check("cfg_coef", self.cfg_coef)
        if self.condition is not None:
            check_condition_name("condition", self.condition)

    @property
    def seeds(self) -> tuple[int | None, int | None]:
        """The (text, audio) seeds in effect."""
        return (
            self.text_seed if self.text_seed is not None else self.seed,
            self.audio_seed if self.audio_seed is not None else self.seed,
        )


#: Kyutai's `lm_gen_config` (config.json: its LMGen's keyword arguments) -> our knobs.
LM_GEN_KNOBS = {
    "temp": "audio_temperature",
    "temp_text": "text_temperature",
    "top_k": "audio_topk",
    "top_k_text": "text_topk",
    "cfg_coef": "cfg_coef",
}


def lm_gen_knobs(lm_gen_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The knob values a model's `lm_gen_config` sets (its default sampling), checked like any flag.

    `use_sampling: false` means greedy (both temperatures 0). Keys that are not about sampling
    (e.g. `check`) set nothing. ValueError for a value out of bounds.
    """
    values: dict[str, Any] = {}
    for key, value in (lm_gen_config or {}).items():
        name = LM_GEN_KNOBS.get(key)
        if name is not None:
            values[name] = KNOBS[name].parse(str(value))
    if (lm_gen_config or {}).get("use_sampling") is False:
        values["text_temperature"] = values["audio_temperature"] = 0.0
    return values


def in_effect(settings: EngineSettings, text_only: bool) -> EngineSettings:
    """The settings a model actually runs with: for a text-only model, greedy text, no audio sampling and no
    seeds (see :data:`TEXT_ONLY_KNOBS`); any other model runs `settings` as given."""
    if not text_only:
        return settings
    return replace(settings, text=GREEDY, audio=GREEDY, seed=None, text_seed=None, audio_seed=None)
