"""Configuration dataclasses for the Moshi LM (temporal transformer + depformer), and the reader of Kyutai's
`config.json`.

Kyutai's keys are read the way its PyTorch `LMModel(**config)` reads them (moshi/models/lm.py, loaders.py):
a key left out means `LMModel`'s own default, not Moshi 7B's; the depformer inherits the keys without the
`depformer_` prefix (gating, max_period, kv_repeat, layer_scale, positional_scale) unless a `depformer_` key
overrides them. Every key is in one of the tables below: read (it changes the maths and is supported), only
describing files or defaults, or refused unless it has its neutral value. A key in no table is refused too: an
unknown key never changes the maths silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import MoshiError

POSITIONAL_EMBEDDINGS = ("rope", "rope_concat", "sin", "sin_rope", "none")
NORMS = ("rms_norm", "layer_norm")
# Kyutai's norm names -> (our kind, eps), as its PyTorch create_norm_fn builds them.
KYUTAI_NORMS = {
    "rms_norm": ("rms_norm", 1e-5),
    "rms_norm_f32": ("rms_norm", 1e-8),
    "layer_norm": ("layer_norm", 1e-5),
    "layer_norm_f32": ("layer_norm", 1e-8),
}
#: Kyutai's gating names we run: SiLU-gated, or the plain GELU MLP ("none").
GATINGS = ("silu", "none")


class ConfigError(MoshiError, ValueError):
    """A config.json the model cannot be built from; one line naming the key."""


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def ffn_hidden_dim(d_model: int, dim_feedforward: int, gated: bool = True) -> int:
    """moshi_mlx's rule for the feed-forward hidden size of our nested config form (the one place it is written).

    A plain MLP's hidden size is the nominal feed-forward size. The gated (SiLU) one is 11/4 * d when
    the nominal size is 4 * d (how Kyutai's MLX configs spell hidden_scale 4.125), else 2/3 of the nominal size.
    """
    if not gated:
        return dim_feedforward
    if dim_feedforward == 4 * d_model:
        return 11 * d_model // 4
    return 2 * dim_feedforward // 3


def kyutai_ffn_hidden(d_model: int, dim_feedforward: int, gated: bool) -> int:
    """Kyutai's PyTorch rule (modules/gating.py): gated hidden 21/8 * d for a 4 * d feed-forward, else 2/3 of it."""
    if not gated:
        return dim_feedforward
    if dim_feedforward == 4 * d_model:
        return 21 * d_model // 8
    return 2 * dim_feedforward // 3


def ffn_nominal_size(d_model: int, hidden: int) -> int | None:
    """The nominal feed-forward size giving a gated hidden size under `ffn_hidden_dim`, if any."""
    for candidate in (4 * d_model, 3 * hidden // 2, 3 * hidden // 2 + 1):
        if ffn_hidden_dim(d_model, candidate) == hidden:
            return candidate
    return None


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    context: int
    max_period: float = 10_000.0
    # "rope" (interleaved pairs), "rope_concat" (halves), "sin" (added to the input), "sin_rope" (both), "none"
    positional_embedding: str = "rope"
    norm_eps: float = 1e-8
    norm: str = "rms_norm"  # "rms_norm" or "layer_norm" (with bias)
    gating: bool = True  # SiLU-gated FFN (gating.linear_in/out), else a GELU MLP (gating.linear1/linear2)
    kv_repeat: int = 1  # grouped-query attention: num_heads / kv_repeat key/value heads
    layer_scale: bool = False  # learnt per-channel scales on both residual branches (layer_scale_{1,2}.scale)
    positional_scale: float = 1.0  # factor on the sinusoidal embedding

    def __post_init__(self) -> None:
        if self.positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ConfigError(
                f"positional_embedding {self.positional_embedding!r} is not one of {', '.join(POSITIONAL_EMBEDDINGS)}"
            )
        if self.norm not in NORMS:
            raise ConfigError(f"norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"num_heads {self.num_heads} does not divide the width {self.d_model}")
        if self.kv_repeat < 1 or self.num_heads % self.kv_repeat:
            raise ConfigError(f"kv_repeat {self.kv_repeat} does not divide num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads // self.kv_repeat

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.d_model, self.dim_feedforward, self.gating)

    @property
    def rope(self) -> str | None:
        """"interleaved", "halves" or None: how queries and keys are rotated."""
        if self.positional_embedding in ("rope", "sin_rope"):
            return "interleaved"
        return "halves" if self.positional_embedding == "rope_concat" else None

    @property
    def sin(self) -> bool:
        return self.positional_embedding in ("sin", "sin_rope")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "transformer") -> TransformerConfig:
        """Our nested form, or Kyutai's MLX `TransformerConfig` (its extra keys only at their neutral values)."""
        _check_keys(data, _NESTED_TRANSFORMER_NEUTRAL, {f.name for f in dataclasses.fields(cls)}, f"{where}.")
        own = _known_fields(cls, data)
        if own.get("layer_scale") is not None and not isinstance(own["layer_scale"], bool):
            own["layer_scale"] = True  # Kyutai's MLX form gives the initial scale; the checkpoint holds the values
        elif own.get("layer_scale") is None:
            own.pop("layer_scale", None)
        return cls(**own)


@dataclass(frozen=True)
class ConditionerConfig:
    """One look-up-table conditioner (Kyutai's `lut` type, `noop` tokenizer), fused by summing.

    Its value picks a row of a table of `n_bins + 1` rows of width `dim`, projected to the model's width.
    """

    name: str
    n_bins: int
    dim: int
    possible_values: tuple[str, ...] | None = None  # None: a value's row is its SHA-256 modulo n_bins
    learn_padding: bool = True  # the checkpoint holds a learnt_padding row (used only for a missing value)

    def __post_init__(self) -> None:
        if self.possible_values is not None and len(self.possible_values) > self.n_bins:
            raise ConfigError(f"conditioners.{self.name}: {len(self.possible_values)} possible_values > n_bins")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConditionerConfig:
        own = _known_fields(cls, data)
        if own.get("possible_values") is not None:
            own["possible_values"] = tuple(own["possible_values"])
        return cls(**own)


#: Metadata keys (what files to use, how to sample by default): kept, never part of the maths.
_METADATA = ("mimi_name", "model_type", "lm_gen_config", "stt")


@dataclass(frozen=True)
class SttConfig:
    """Kyutai's `stt_config` of a speech-to-text model: how its text stream lags the audio it hears.

    The model writes a word `audio_delay_seconds` after the audio holding it (so a file's end is flushed with
    that much silence), and was trained with `audio_silence_prefix_seconds` of silence before the speech.
    """

    audio_delay_seconds: float = 0.0
    audio_silence_prefix_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("audio_delay_seconds", "audio_silence_prefix_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 3600:
                raise ConfigError(f"config key stt_config.{name}={value!r}: expected seconds >= 0")

    @classmethod
    def from_dict(cls, data: Any) -> SttConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"config key stt_config={data!r}: expected a JSON object")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"config key stt_config.{min(unknown)} is not known to moshi_mlx")
        return cls(**{k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in data.items()})


@dataclass(frozen=True)
class LmConfig:
    transformer: TransformerConfig
    depformer: TransformerConfig
    text_in_vocab_size: int = 32001
    text_out_vocab_size: int = 32000
    audio_vocab_size: int = 2049
    audio_codebooks: int = 16  # Moshi's generated streams followed by the user's
    generated_codebooks: int = 8
    audio_delays: tuple[int, ...] = (0, 1, 1, 1, 1, 1, 1, 1) * 2
    text_padding_id: int = 3  # Moshi's text "no word here" token
    end_of_text_padding_id: int = 0  # marks the end of a padding run, just before a word
    # Depformer embeddings of this rank followed by a linear map to the depformer width (None: full rank).
    depformer_low_rank_embeddings: int | None = None
    # Step k of the depformer uses weight set schedule[k] (None: one set per step). Informational here: the
    # MLX layout stores each step's weights, and the converter copies shared sets to the steps using them.
    depformer_weights_per_step_schedule: tuple[int, ...] | None = None
    # Kyutai's depformer_norm: a norm on each depformer step's output before its head (None: none).
    depformer_out_norm: str | None = None
    # Linear heads on the temporal transformer's output (Kyutai's extra_heads_*), each giving extra_heads_dim.
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    # Look-up-table conditioners summed into the temporal input at every step (Kyutai's `fuser: {sum: [...]}`).
    conditioners: tuple[ConditionerConfig, ...] = ()
    # Metadata from config.json: not part of the maths, so not part of equality.
    mimi_name: str | None = field(default=None, compare=False)
    model_type: str = field(default="moshi", compare=False)
    lm_gen_config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # Kyutai's stt_config (speech-to-text models): the text stream's lag behind the audio. None: not an STT model.
    stt: SttConfig | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.audio_delays) != self.audio_codebooks:
            raise ConfigError(
                f"delays has {len(self.audio_delays) + 1} entries but n_q is {self.audio_codebooks} (expected n_q + 1)"
            )
        if not 0 <= self.generated_codebooks <= self.audio_codebooks:
            raise ConfigError(f"dep_q must be in 0..{self.audio_codebooks} (n_q), got {self.generated_codebooks}")
        schedule = self.depformer_weights_per_step_schedule
        if schedule is not None and len(schedule) != self.generated_codebooks:
            raise ConfigError(
                f"depformer_weights_per_step_schedule has {len(schedule)} entries, expected {self.generated_codebooks}"
            )
        if self.depformer_out_norm is not None and self.depformer_out_norm not in KYUTAI_NORMS:
            raise ConfigError(f"depformer_norm {self.depformer_out_norm!r} is not one of {', '.join(KYUTAI_NORMS)}")
        names = [c.name for c in self.conditioners]
        if len(set(names)) != len(names):
            raise ConfigError(f"conditioners: a name appears twice in {names}")

    @property
    def text_only(self) -> bool:
        """True for a model that generates text only (dep_q 0: no depformer, no audio out), e.g. Kyutai's STT."""
        return self.generated_codebooks == 0

    @property
    def user_codebooks(self) -> int:
        return self.audio_codebooks - self.generated_codebooks

    @property
    def audio_card(self) -> int:
        """Number of real audio codes (the last input id is padding)."""
        return self.audio_vocab_size - 1

    @property
    def max_delay(self) -> int:
        return max(self.audio_delays, default=0)

    @property
    def mimi_codebooks(self) -> int:
        """How many codebooks Mimi encodes and decodes for this model (Kyutai's loaders: max(dep_q, n_q - dep_q))."""
        return max(self.generated_codebooks, self.user_codebooks)

    @property
    def is_conditioned(self) -> bool:
        """True when every step needs a condition (Lm.condition) added to its input."""
        return bool(self.conditioners)

    @property
    def conditioner_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.conditioners)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lm_gen_config"] = dict(self.lm_gen_config)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LmConfig:
        """Build from our own `to_dict()` output, Kyutai's MLX nested form, or a Kyutai `config.json`.

        Raises ConfigError (one line naming the key) for anything that would change the maths and is not
        supported, before any weights are touched.
        """
        data = dict(data)
        if isinstance(data.get("transformer"), dict):
            return cls._from_nested(data)
        return cls._from_kyutai(data)

    @classmethod
    def _from_nested(cls, data: dict[str, Any]) -> LmConfig:
        _check_keys(data, _NESTED_LM_NEUTRAL, {f.name for f in dataclasses.fields(cls)} | KYUTAI_METADATA_KEYS, "")
        own = dict(_known_fields(cls, data))
        own["transformer"] = TransformerConfig.from_dict(data["transformer"])
        dep = data["depformer"]
        if isinstance(dep.get("transformer"), dict):  # Kyutai's MLX DepFormerConfig
            _check_keys(dep, {}, {"transformer", "num_slices", "weights_per_step_schedule", "low_rank_embeddings"},
                        "depformer.")
            own.setdefault("generated_codebooks", dep["num_slices"])
            own.setdefault("depformer_weights_per_step_schedule", dep.get("weights_per_step_schedule"))
            own.setdefault("depformer_low_rank_embeddings", dep.get("low_rank_embeddings"))
            dep = dep["transformer"]
        own["depformer"] = TransformerConfig.from_dict(dep, "depformer")
        for key in ("audio_delays", "depformer_weights_per_step_schedule"):
            if own.get(key) is not None:
                own[key] = tuple(own[key])
        conds = data.get("conditioners") or ()
        if isinstance(conds, dict):  # Kyutai's MLX form: {name: {n_bins, dim, tokenizer, possible_values}}
            conds = [{"name": name, **c} for name, c in conds.items()]
        own["conditioners"] = tuple(ConditionerConfig.from_dict(c) for c in conds)
        own["lm_gen_config"] = dict(own.get("lm_gen_config") or {})
        stt = own.get("stt") or data.get("stt_config")
        own["stt"] = SttConfig.from_dict(stt) if stt is not None else None
        own.pop("stt_config", None)
        return cls(**own)

    @classmethod
    def _from_kyutai(cls, data: dict[str, Any]) -> LmConfig:
        return read_kyutai_config(data)

    def to_kyutai_dict(self) -> dict[str, Any]:
        """The Kyutai `config.json` keys that describe this model."""
        t, d = self.transformer, self.depformer
        norm = _kyutai_norm_name(t)
        dep_norm = _kyutai_norm_name(d)
        if dep_norm != norm:
            raise ConfigError("Kyutai's config.json has one norm for both transformers; this config has two")
        out: dict[str, Any] = {
            "dim": t.d_model,
            "num_heads": t.num_heads,
            "num_layers": t.num_layers,
            "hidden_scale": _hidden_scale(t),
            "causal": True,
            "layer_scale": 0.01 if t.layer_scale else None,
            "context": t.context,
            "max_period": t.max_period,
            "positional_embedding": t.positional_embedding,
            "gating": "silu" if t.gating else "none",
            "norm": norm,
            "kv_repeat": t.kv_repeat,
            "depformer_dim": d.d_model,
            "depformer_num_heads": d.num_heads,
            "depformer_num_layers": d.num_layers,
            "depformer_dim_feedforward": _kyutai_feedforward(d),
            "depformer_context": d.context,
            "depformer_max_period": d.max_period,
            "depformer_pos_emb": d.positional_embedding,
            "depformer_gating": "silu" if d.gating else "none",
            "depformer_kv_repeat": d.kv_repeat,
            "depformer_layer_scale": 0.01 if d.layer_scale else None,
            "depformer_multi_linear": True,
            "depformer_weights_per_step": d.gating,  # Kyutai has per-step weights only with a gated FFN
            "depformer_weights_per_step_schedule": (
                list(self.depformer_weights_per_step_schedule) if self.depformer_weights_per_step_schedule else None
            ),
            "depformer_low_rank_embeddings": self.depformer_low_rank_embeddings,
            "depformer_norm": self.depformer_out_norm,
            "existing_text_padding_id": self.text_padding_id,
            "existing_text_end_padding_id": self.end_of_text_padding_id,
            "extra_heads_num_heads": self.extra_heads_num_heads,
            "extra_heads_dim": self.extra_heads_dim,
            "dep_q": self.generated_codebooks,
            "text_card": self.text_out_vocab_size,
            "card": self.audio_card,
            "n_q": self.audio_codebooks,
            "delays": [0, *self.audio_delays],
            "model_type": self.model_type,
            "lm_gen_config": dict(self.lm_gen_config),
        }
        if self.stt is not None:
            out["stt_config"] = dataclasses.asdict(self.stt)
        if t.positional_scale != 1.0:
            out["positional_scale"] = t.positional_scale
        if d.positional_scale != t.positional_scale:
            out["depformer_positional_scale"] = d.positional_scale
        if self.mimi_name is not None:
            out["mimi_name"] = self.mimi_name
        if self.conditioners:
            out["conditioners"] = {c.name: _kyutai_conditioner(c) for c in self.conditioners}
            out["fuser"] = {"sum": [c.name for c in self.conditioners]}
        return out


def _kyutai_norm_name(t: TransformerConfig) -> str:
    return next(name for name, spec in KYUTAI_NORMS.items() if spec == (t.norm, t.norm_eps))


def kyutai_feedforward(d_model: int, hidden: int, gated: bool) -> int:
    """The nominal feed-forward size Kyutai's rule (`kyutai_ffn_hidden`) turns into `hidden`."""
    if not gated:
        return hidden
    if hidden == 21 * d_model // 8:
        return 4 * d_model
    for candidate in (3 * hidden // 2, 3 * hidden // 2 + 1):
        if candidate != 4 * d_model and kyutai_ffn_hidden(d_model, candidate, True) == hidden:
            return candidate
    raise ConfigError(f"no Kyutai feed-forward size gives the hidden size {hidden} for width {d_model}")


def kyutai_hidden_scale(d_model: int, hidden: int, gated: bool) -> float:
    """Kyutai's hidden_scale for a temporal hidden size (4.125 for Moshi's 11/4 * d, as published)."""
    ff = kyutai_feedforward(d_model, hidden, gated)
    if gated and ff == int(4.125 * d_model):
        return 4.125
    return ff / d_model


def _kyutai_feedforward(t: TransformerConfig) -> int:
    return kyutai_feedforward(t.d_model, t.hidden_dim, t.gating)


def _hidden_scale(t: TransformerConfig) -> float:
    return kyutai_hidden_scale(t.d_model, t.hidden_dim, t.gating)


def _kyutai_conditioner(c: ConditionerConfig) -> dict[str, Any]:
    lut: dict[str, Any] = {"n_bins": c.n_bins, "dim": c.dim, "tokenizer": "noop"}
    if c.possible_values is not None:
        lut["possible_values"] = list(c.possible_values)
    if not c.learn_padding:
        lut["learn_padding"] = False
    return {"type": "lut", "lut": lut}


# ---------------------------------------------------------------------------------------------------------
# the key policy


def _neutral(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, tuple):
        return any(_neutral(value, n) for n in neutral)
    if neutral is None:
        return value is None or value is False or value == 0 or value == [] or value == {}
    return value == neutral and type(value) is type(neutral)


def _check_keys(data: Mapping[str, Any], neutral: Mapping[str, Any], read: set[str] | frozenset[str], prefix: str) -> None:
    """Refuse, naming the key, a key that is neither read nor at its neutral value (unknown keys included)."""
    for key, value in data.items():
        if key in read:
            continue
        if key not in neutral:
            raise ConfigError(
                f"config key {prefix}{key!r} is not known to moshi_mlx (it could change the model's maths); "
                "remove it if it does not"
            )
        if not _neutral(value, neutral[key]):
            raise ConfigError(f"config key {prefix}{key}={value!r} is not supported by moshi_mlx")


#: Kyutai's MLX TransformerConfig keys that we do not model, at the values that leave the maths as ours.
_NESTED_TRANSFORMER_NEUTRAL: dict[str, Any] = {
    "causal": True, "norm_first": True, "bias_ff": None, "bias_attn": None, "use_conv_block": None,
    "cross_attention": None, "conv_kernel_size": (3, None), "use_conv_bias": (True, False, None),
    "conv_layout": None, "max_seq_len": (4096, None), "layer_scale": None,
}
#: The same for Kyutai's MLX LmConfig.
_NESTED_LM_NEUTRAL: dict[str, Any] = {"demux_second_stream": None}

#: Kyutai config.json keys that describe files, training or defaults: kept or ignored, never part of the maths.
KYUTAI_METADATA_KEYS = frozenset({
    "moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type", "lm_gen_config",
    "tts_config", "stt_config", "model_id", "lora", "lora_rank", "lora_scaling", "gradient_checkpointing",
    "betas", "quantization", "checkpointing", "depformer_causal", "depformer_context", "depformer_betas",
})
#: Keys LMModel would accept that change the maths in ways we do not run: refused unless at this neutral value.
KYUTAI_REFUSED_UNLESS: dict[str, Any] = {
    "causal": True, "cross_attention": None, "demux_second_stream": None, "demux_second_text_stream": None,
    "norm_emb": None, "bias_proj": None, "quantize": None, "skip_self_attn": None, "weights_per_step": None,
    "weights_per_step_schedule": None, "depformer_skip_self_attn": None, "depformer_cross_attention": None,
    "depformer_quantize": None,
}
#: LMModel's defaults (moshi/models/lm.py) for the keys we read, used when a config.json leaves them out.
KYUTAI_DEFAULTS: dict[str, Any] = {
    "n_q": 8, "dep_q": 8, "card": 1024, "text_card": 32000, "text_card_out": None, "dim": 128, "num_heads": 8,
    "hidden_scale": 4, "norm": "layer_norm", "depformer_dim": 256, "depformer_dim_feedforward": None,
    "depformer_multi_linear": False, "depformer_weights_per_step": False,
    "depformer_weights_per_step_schedule": None, "depformer_low_rank_embeddings": None,
    "depformer_pos_emb": "sin", "depformer_norm": None, "existing_text_padding_id": 3,
    "existing_text_end_padding_id": 0, "extra_heads_num_heads": 0, "extra_heads_dim": 6, "context": None,
    # StreamingTransformer / its layers' defaults, reached through LMModel's **kwargs:
    "positional_embedding": "sin", "max_period": 10_000, "gating": "none", "kv_repeat": 1, "layer_scale": None,
    "positional_scale": 1.0,
}
#: Keys the depformer inherits from the temporal transformer unless `depformer_<key>` is given.
KYUTAI_INHERITED = ("gating", "max_period", "kv_repeat", "layer_scale", "positional_scale", "num_layers")
_KYUTAI_READ = frozenset(KYUTAI_DEFAULTS) | {
    "num_layers", "delays", "depformer_num_heads", "depformer_num_layers", "conditioners", "fuser",
} | {f"depformer_{k}" for k in KYUTAI_INHERITED}


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config key {key}={value!r}: expected a non-negative integer")
    return value


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key {key}={value!r}: expected a number")
    return float(value)


def _choice(data: Mapping[str, Any], key: str, choices: tuple[str, ...] | Mapping[str, Any]) -> str:
    value = data[key]
    if value not in choices:
        raise ConfigError(f"config key {key}={value!r} is not supported (one of: {', '.join(choices)})")
    return value


def _feedforward(data: Mapping[str, Any], key: str, d_model: int, gated: bool) -> int:
    """Kyutai's nominal feed-forward size -> our nested `dim_feedforward` giving the same hidden size."""
    value = data[key]
    if isinstance(value, list):  # one size per depformer weight set: supported when they agree
        if not value or len(set(value)) != 1:
            raise ConfigError(f"config key {key}={value!r}: different feed-forward sizes per step are not supported")
        value = value[0]
    ff = int(value)
    hidden = kyutai_ffn_hidden(d_model, ff, gated)
    if not gated:
        return hidden
    nominal = ffn_nominal_size(d_model, hidden)
    if nominal is None:
        raise ConfigError(f"config key {key}={value!r}: hidden size {hidden} cannot be represented")
    return nominal


def _conditioners(data: Mapping[str, Any]) -> tuple[ConditionerConfig, ...]:
    """Kyutai's `conditioners` + `fuser`: only look-up tables, only fused by summing."""
    declared = data.get("conditioners") or {}
    fuser = data.get("fuser") or {}
    if not isinstance(declared, dict) or not isinstance(fuser, dict):
        raise ConfigError("config keys conditioners and fuser must be JSON objects")
    for method, names in fuser.items():
        if method in ("cross", "prepend"):
            if names:
                raise ConfigError(f"config key fuser.{method}={names!r} is not supported (only fuser.sum)")
        elif method in ("cross_attention_pos_emb", "cross_attention_pos_emb_scale"):
            continue  # only used with fuser.cross, refused above
        elif method != "sum":
            raise ConfigError(f"config key fuser.{method} is not known to moshi_mlx")
    summed = list(fuser.get("sum") or [])
    out = []
    for name in summed:
        if name not in declared:
            raise ConfigError(f"config key fuser.sum names {name!r}, which conditioners does not declare")
    for name, spec in declared.items():
        if name not in summed:
            raise ConfigError(f"config key conditioners.{name} is not fused by fuser.sum (not supported)")
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind != "lut":
            raise ConfigError(f"config key conditioners.{name}.type={kind!r} is not supported (only 'lut')")
        lut = dict(spec.get("lut") or {})
        if lut.get("tokenizer", "noop") != "noop":
            raise ConfigError(f"config key conditioners.{name}.lut.tokenizer={lut['tokenizer']!r} is not supported")
        if lut.get("output_bias", False) or lut.get("force_linear", True) is not True:
            raise ConfigError(f"config key conditioners.{name}.lut: output_bias/force_linear are not supported")
        unknown = set(lut) - {"n_bins", "dim", "tokenizer", "possible_values", "init_scale", "learn_padding",
                              "pad_empty", "output_bias", "force_linear"}
        if unknown:
            raise ConfigError(f"config key conditioners.{name}.lut.{min(unknown)} is not known to moshi_mlx")
        if "n_bins" not in lut or "dim" not in lut:
            raise ConfigError(f"config key conditioners.{name}.lut needs n_bins and dim")
        values = lut.get("possible_values")
        out.append(ConditionerConfig(
            name=name, n_bins=_int(lut, "n_bins"), dim=_int(lut, "dim"),
            possible_values=tuple(str(v) for v in values) if values is not None else None,
            learn_padding=bool(lut.get("learn_padding", True)),
        ))
    return tuple(out)


def check_kyutai_keys(raw: Mapping[str, Any]) -> None:
    """Refuse (ConfigError naming the key) any key of a Kyutai config.json that moshi_mlx would not honour:
    unknown keys, refused options, unsupported choices, conditioners other than summed look-up tables.
    Needs no complete config, so a converter can check a partial --config before reading any weights."""
    _check_keys(raw, KYUTAI_REFUSED_UNLESS, _KYUTAI_READ | KYUTAI_METADATA_KEYS, "")
    choices: dict[str, Any] = {
        "norm": KYUTAI_NORMS, "depformer_norm": KYUTAI_NORMS, "gating": GATINGS, "depformer_gating": GATINGS,
        "positional_embedding": POSITIONAL_EMBEDDINGS, "depformer_pos_emb": POSITIONAL_EMBEDDINGS,
    }
    for key, allowed in choices.items():
        if raw.get(key) is not None:
            _choice(raw, key, allowed)
    _conditioners(raw)


def read_kyutai_config(raw: Mapping[str, Any]) -> LmConfig:
    """An LmConfig from Kyutai's flat config.json keys, as `LMModel(**config)` would read them."""
    check_kyutai_keys(raw)
    for key in ("num_layers", "delays"):
        if key not in raw:
            raise ConfigError(f"config.json lacks the required key {key}")
    data = {**KYUTAI_DEFAULTS, **raw}
    for key in KYUTAI_INHERITED:
        if f"depformer_{key}" not in raw:  # an explicit null (e.g. depformer_layer_scale) is Kyutai's None
            data[f"depformer_{key}"] = data[key]
    if data["text_card_out"] is not None and data["text_card_out"] != data["text_card"]:
        raise ConfigError(f"config key text_card_out={data['text_card_out']!r} (different from text_card) is not supported")
    if data["context"] is None:
        raise ConfigError("config key context is null (unbounded attention): a streaming model needs a context")
    if "depformer_num_heads" not in data and data["dep_q"] == 0:
        data["depformer_num_heads"] = 1  # a text-only model has no depformer: LMModel never reads its keys
    if "depformer_num_heads" not in data:
        raise ConfigError("config.json lacks the required key depformer_num_heads")
    dim, dep_dim = _int(data, "dim"), _int(data, "depformer_dim")
    norm, eps = KYUTAI_NORMS[_choice(data, "norm", KYUTAI_NORMS)]
    gated = _choice(data, "gating", GATINGS) == "silu"
    dep_gated = _choice(data, "depformer_gating", GATINGS) == "silu"
    if not dep_gated and data["depformer_weights_per_step"]:
        raise ConfigError("config key depformer_weights_per_step needs a gated depformer (depformer_gating)")
    transformer = TransformerConfig(
        d_model=dim,
        num_heads=_int(data, "num_heads"),
        num_layers=_int(data, "num_layers"),
        dim_feedforward=_feedforward({"hidden_scale": int(_number(data, "hidden_scale") * dim)}, "hidden_scale", dim, gated),
        context=_int(data, "context"),
        max_period=_number(data, "max_period"),
        positional_embedding=_choice(data, "positional_embedding", POSITIONAL_EMBEDDINGS),
        norm_eps=eps,
        norm=norm,
        gating=gated,
        kv_repeat=_int(data, "kv_repeat"),
        layer_scale=data["layer_scale"] is not None,
        positional_scale=_number(data, "positional_scale"),
    )
    dep_ff = data["depformer_dim_feedforward"]
    if dep_ff is None:
        dep_ff = int(_number(data, "hidden_scale") * dep_dim)
    dep_q = _int(data, "dep_q")
    depformer = TransformerConfig(
        d_model=dep_dim,
        num_heads=_int(data, "depformer_num_heads"),
        num_layers=_int(data, "depformer_num_layers"),
        dim_feedforward=_feedforward({"depformer_dim_feedforward": dep_ff}, "depformer_dim_feedforward", dep_dim, dep_gated),
        context=dep_q,  # Kyutai forces the depformer's context to None: it attends to the whole frame
        max_period=_number(data, "depformer_max_period"),
        positional_embedding=_choice(data, "depformer_pos_emb", POSITIONAL_EMBEDDINGS),
        norm_eps=eps,
        norm=norm,
        gating=dep_gated,
        kv_repeat=_int(data, "depformer_kv_repeat"),
        layer_scale=data.get("depformer_layer_scale") is not None,
        positional_scale=_number(data, "depformer_positional_scale"),
    )
    delays = data["delays"]
    n_q = _int(data, "n_q")
    if not isinstance(delays, list) or len(delays) != n_q + 1:
        raise ConfigError(f"config key delays has {len(delays) if isinstance(delays, list) else delays!r} entries; expected n_q + 1 = {n_q + 1}")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in delays):
        raise ConfigError(f"config key delays={delays!r}: expected non-negative integers")
    schedule = data["depformer_weights_per_step_schedule"]
    low_rank = data["depformer_low_rank_embeddings"]
    lm_gen = raw.get("lm_gen_config") or {}
    if not isinstance(lm_gen, dict):
        raise ConfigError(f"config key lm_gen_config={lm_gen!r}: expected a JSON object")
    return LmConfig(
        transformer=transformer,
        depformer=depformer,
        text_in_vocab_size=_int(data, "text_card") + 1,
        text_out_vocab_size=_int(data, "text_card"),
        audio_vocab_size=_int(data, "card") + 1,
        audio_codebooks=n_q,
        generated_codebooks=dep_q,
        audio_delays=tuple(int(d) for d in delays[1:]),  # the first delay belongs to the text stream
        text_padding_id=_int(data, "existing_text_padding_id"),
        end_of_text_padding_id=_int(data, "existing_text_end_padding_id"),
        depformer_low_rank_embeddings=int(low_rank) if low_rank is not None else None,
        depformer_weights_per_step_schedule=tuple(int(i) for i in schedule) if schedule is not None else None,
        depformer_out_norm=_choice(data, "depformer_norm", KYUTAI_NORMS) if data["depformer_norm"] else None,
        extra_heads_num_heads=_int(data, "extra_heads_num_heads"),
        extra_heads_dim=_int(data, "extra_heads_dim"),
        conditioners=_conditioners(raw),
        mimi_name=raw.get("mimi_name"),
        model_type=str(raw.get("model_type", "moshi")),
        lm_gen_config=dict(lm_gen),
        stt=SttConfig.from_dict(raw["stt_config"]) if raw.get("stt_config") is not None else None,
    )


def config_v0_1() -> LmConfig:
    """Moshiko / Moshika 7B (kyutai/moshi{ko,ka}-mlx-*)."""
    return LmConfig(
        transformer=TransformerConfig(d_model=4096, num_heads=32, num_layers=32, dim_feedforward=16384, context=3000),
        depformer=TransformerConfig(
            d_model=1024, num_heads=16, num_layers=6, dim_feedforward=4096, context=8, positional_embedding="none"
        ),
    )


def config_small() -> LmConfig:
    """About 340M parameters: the 7B layout scaled down, for benchmarks."""
    return LmConfig(
        transformer=TransformerConfig(d_model=1024, num_heads=16, num_layers=8, dim_feedforward=4096, context=3000),
        depformer=TransformerConfig(
            d_model=512, num_heads=8, num_layers=4, dim_feedforward=2048, context=8, positional_embedding="none"
        ),
    )


def config_tiny(context: int = 3000) -> LmConfig:
    """Tiny random-weight model for tests and --demo; sizes stay quantizable with group sizes 32 and 64."""
    return LmConfig(
        transformer=TransformerConfig(d_model=256, num_heads=4, num_layers=4, dim_feedforward=1024, context=context),
        depformer=TransformerConfig(
            d_model=256, num_heads=4, num_layers=2, dim_feedforward=1024, context=8, positional_embedding="none"
        ),
    )


def config_tiny_stt(context: int = 375) -> LmConfig:
    """Tiny random-weight speech-to-text model (Kyutai's STT layout: text only, 32 codebooks of the speaker, no
    delays, an 8000-piece text vocabulary, four VAD heads, `stt_config` of stt-1b-en_fr) for tests and stand-ins."""
    return LmConfig(
        # gated hidden size 128 (2/3 of 192): every matrix quantizable with groups of 32 and 64
        transformer=TransformerConfig(d_model=64, num_heads=2, num_layers=2, dim_feedforward=192, context=context),
        depformer=TransformerConfig(d_model=64, num_heads=1, num_layers=0, dim_feedforward=192, context=0),
        text_in_vocab_size=8001, text_out_vocab_size=8000, audio_codebooks=32, generated_codebooks=0,
        audio_delays=(0,) * 32, extra_heads_num_heads=4, extra_heads_dim=6, model_type="stt",
        stt=SttConfig(audio_delay_seconds=0.5, audio_silence_prefix_seconds=0.0),
    )


PRESETS = {"tiny": config_tiny, "small": config_small, "7b": config_v0_1}


def preset(name: str) -> LmConfig:
    try:
        return PRESETS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose one of: {', '.join(PRESETS)}") from None


__all__ = [
    "ConditionerConfig", "ConfigError", "SttConfig", "TransformerConfig", "LmConfig", "config_v0_1", "config_small",
    "config_tiny", "config_tiny_stt", "preset", "PRESETS", "check_kyutai_keys", "read_kyutai_config",
]
