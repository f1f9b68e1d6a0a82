"""Configuration dataclasses for the Moshi LM (temporal transformer + depformer)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POSITIONAL_EMBEDDINGS = ("rope", "sin", "none")
NORMS = ("rms_norm", "layer_norm")
# Kyutai's norm names -> (our kind, eps), as its PyTorch create_norm_fn builds them.
KYUTAI_NORMS = {
    "rms_norm": ("rms_norm", 1e-5),
    "rms_norm_f32": ("rms_norm", 1e-8),
    "layer_norm": ("layer_norm", 1e-5),
    "layer_norm_f32": ("layer_norm", 1e-8),
}


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def ffn_hidden_dim(d_model: int, dim_feedforward: int, gated: bool = True) -> int:
    """Moshi's rule for the feed-forward hidden size (the one place it is written down).

    A plain MLP's hidden size is the nominal feed-forward size. The gated (SiLU) one is 11/4 * d when
    the nominal size is 4 * d (Kyutai's hidden_scale 4.125), else 2/3 of the nominal size.
    """
    if not gated:
        return dim_feedforward
    if dim_feedforward == 4 * d_model:
        return 11 * d_model // 4
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
    positional_embedding: str = "rope"  # "rope", "sin" (added to the input) or "none"
    norm_eps: float = 1e-8
    norm: str = "rms_norm"  # "rms_norm" or "layer_norm" (with bias)
    gating: bool = True  # SiLU-gated FFN (gating.linear_in/out), else a GELU MLP (gating.linear1/linear2)

    def __post_init__(self) -> None:
        if self.positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ValueError(
                f"positional_embedding {self.positional_embedding!r} is not one of {', '.join(POSITIONAL_EMBEDDINGS)}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is not one of {', '.join(NORMS)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.d_model, self.dim_feedforward, self.gating)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        return cls(**_known_fields(cls, data))


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

    def __post_init__(self) -> None:
        if len(self.audio_delays) != self.audio_codebooks:
            raise ValueError(
                f"audio_delays has {len(self.audio_delays)} entries but audio_codebooks is {self.audio_codebooks}"
            )
        if not 0 < self.generated_codebooks <= self.audio_codebooks:
            raise ValueError(f"generated_codebooks must be in 1..{self.audio_codebooks}")
        schedule = self.depformer_weights_per_step_schedule
        if schedule is not None and len(schedule) != self.generated_codebooks:
            raise ValueError(
                f"depformer_weights_per_step_schedule has {len(schedule)} entries, expected {self.generated_codebooks}"
            )

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LmConfig":
        """Build from our own `to_dict()` output or from a Kyutai `config.json` (lm_config keys).

        Unknown keys are ignored so a config.json loads directly.
        """
        if "transformer" in data and isinstance(data["transformer"], dict):
            own = dict(_known_fields(cls, data))
            own["transformer"] = TransformerConfig.from_dict(data["transformer"])
            dep = data["depformer"]
            dep = dep.get("transformer", dep)  # accept the reference's nested DepFormerConfig too
            own["depformer"] = TransformerConfig.from_dict(dep)
            if "num_slices" in data.get("depformer", {}):
                own.setdefault("generated_codebooks", data["depformer"]["num_slices"])
            for key in ("audio_delays", "depformer_weights_per_step_schedule"):
                if own.get(key) is not None:
                    own[key] = tuple(own[key])
            return cls(**own)
        return cls._from_kyutai(data)

    @classmethod
    def _from_kyutai(cls, data: dict[str, Any]) -> "LmConfig":
        missing = [k for k in ("dim", "num_heads", "num_layers", "text_card", "card", "n_q", "delays") if k not in data]
        if missing:
            raise ValueError(f"config.json lacks required Moshi keys: {', '.join(missing)}")
        dim = int(data["dim"])
        norm_name = str(data.get("norm", "rms_norm_f32"))
        if norm_name not in KYUTAI_NORMS:
            raise ValueError(f"config.json norm {norm_name!r} is not one of {', '.join(KYUTAI_NORMS)}")
        norm, eps = KYUTAI_NORMS[norm_name]
        gating = str(data.get("gating", "silu"))
        if gating not in ("silu", "none"):
            raise ValueError(f"config.json gating {gating!r} is not supported (silu or none)")
        # The nominal feed-forward is hidden_scale * dim. Moshi's 4.125 gives a gated hidden of 11/4 d,
        # which we spell as 4 * d (see TransformerConfig.hidden_dim).
        scale = float(data.get("hidden_scale", 4.125))
        transformer = TransformerConfig(
            d_model=dim,
            num_heads=int(data["num_heads"]),
            num_layers=int(data["num_layers"]),
            dim_feedforward=4 * dim if gating == "silu" and scale == 4.125 else round(scale * dim),
            context=int(data.get("context", 3000)),
            max_period=float(data.get("max_period", 10_000)),
            positional_embedding=str(data.get("positional_embedding", "rope")),
            norm_eps=eps,
            norm=norm,
            gating=gating == "silu",
        )
        dep_dim = int(data.get("depformer_dim", 1024))
        depformer = TransformerConfig(
            d_model=dep_dim,
            num_heads=int(data.get("depformer_num_heads", 16)),
            num_layers=int(data.get("depformer_num_layers", 6)),
            dim_feedforward=int(data.get("depformer_dim_feedforward", 4 * dep_dim)),
            context=int(data.get("depformer_context", data.get("dep_q", 8))),
            max_period=float(data.get("depformer_max_period", 10_000)),
            positional_embedding=str(data.get("depformer_pos_emb", "none")),
            norm_eps=eps,
            norm=norm,
            gating=gating == "silu",
        )
        schedule = data.get("depformer_weights_per_step_schedule")
        low_rank = data.get("depformer_low_rank_embeddings")
        delays = [int(d) for d in data["delays"]]
        n_q = int(data["n_q"])
        return cls(
            transformer=transformer,
            depformer=depformer,
            text_in_vocab_size=int(data["text_card"]) + 1,
            text_out_vocab_size=int(data["text_card"]),
            audio_vocab_size=int(data["card"]) + 1,
            audio_codebooks=n_q,
            generated_codebooks=int(data.get("dep_q", n_q // 2)),
            audio_delays=tuple(delays[1:]),  # the first delay belongs to the text stream
            text_padding_id=int(data.get("existing_text_padding_id", 3)),
            end_of_text_padding_id=int(data.get("existing_text_end_padding_id", 0)),
            depformer_low_rank_embeddings=int(low_rank) if low_rank is not None else None,
            depformer_weights_per_step_schedule=tuple(int(i) for i in schedule) if schedule is not None else None,
        )

    def to_kyutai_dict(self) -> dict[str, Any]:
        """The Kyutai `config.json` keys that describe this model."""
        t, d = self.transformer, self.depformer
        norm = next(name for name, spec in KYUTAI_NORMS.items() if spec == (t.norm, t.norm_eps))
        return {
            "dim": t.d_model,
            "num_heads": t.num_heads,
            "num_layers": t.num_layers,
            "hidden_scale": 4.125 if t.gating and t.dim_feedforward == 4 * t.d_model else t.dim_feedforward / t.d_model,
            "causal": True,
            "layer_scale": None,
            "context": t.context,
            "max_period": t.max_period,
            "positional_embedding": t.positional_embedding,
            "gating": "silu" if t.gating else "none",
            "norm": norm,
            "depformer_dim": d.d_model,
            "depformer_num_heads": d.num_heads,
            "depformer_num_layers": d.num_layers,
            "depformer_dim_feedforward": d.dim_feedforward,
            "depformer_context": d.context,
            "depformer_max_period": d.max_period,
            "depformer_pos_emb": d.positional_embedding,
            "depformer_multi_linear": True,
            "depformer_weights_per_step": True,
            "depformer_weights_per_step_schedule": (
                list(self.depformer_weights_per_step_schedule) if self.depformer_weights_per_step_schedule else None
            ),
            "depformer_low_rank_embeddings": self.depformer_low_rank_embeddings,
            "existing_text_padding_id": self.text_padding_id,
            "existing_text_end_padding_id": self.end_of_text_padding_id,
            "dep_q": self.generated_codebooks,
            "text_card": self.text_out_vocab_size,
            "card": self.audio_card,
            "n_q": self.audio_codebooks,
            "delays": [0, *self.audio_delays],
        }


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


PRESETS = {"tiny": config_tiny, "small": config_small, "7b": config_v0_1}


def preset(name: str) -> LmConfig:
    try:
        return PRESETS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose one of: {', '.join(PRESETS)}") from None


__all__ = ["TransformerConfig", "LmConfig", "config_v0_1", "config_small", "config_tiny", "preset", "PRESETS"]
