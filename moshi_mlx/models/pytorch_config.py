"""The config.json of a converted checkpoint: what the shapes fix (`Dims`), plus what they cannot show.

The weights do not record the head counts, the context or the codebook delays: a user's config (Kyutai's
config.json, or our own nested `LmConfig.to_dict()` form) fills them, else Moshi 7B's values are assumed and
said so. Pure: no file is read here.
"""

from __future__ import annotations

from typing import Any

from .config import LmConfig, ffn_hidden_dim, ffn_nominal_size
from .pytorch import ConvertError, Dims

__all__ = ["SHAPE_KEYS", "build_config"]

#: Keys fixed by the tensor shapes: a --config value for them must agree with the checkpoint.
SHAPE_KEYS = ("dim", "num_layers", "text_card", "card", "n_q", "dep_q", "depformer_dim", "depformer_num_layers")


def _ffn_sizes(d: Dims) -> tuple[float, int]:
    """(hidden_scale, depformer_dim_feedforward) as config.json describes the two FFNs."""
    if d.gating:
        ff = ffn_nominal_size(d.dim, d.hidden)
        if ff is None:
            raise ConvertError(f"temporal FFN hidden size {d.hidden} cannot be described in config.json")
        hidden_scale = 4.125 if ff == 4 * d.dim else ff / d.dim
        dep_ff = ffn_nominal_size(d.dep_dim, d.dep_hidden)
    else:
        hidden_scale, dep_ff = d.hidden / d.dim, d.dep_hidden  # a plain MLP's hidden size is the feed-forward size
    if dep_ff is None:
        raise ConvertError(f"depformer FFN hidden size {d.dep_hidden} cannot be described in config.json")
    return hidden_scale, dep_ff


def _derived(d: Dims, user_norm: Any) -> dict[str, Any]:
    """The keys the shapes fix (a user's norm only refines their kind, e.g. rms_norm_f32)."""
    hidden_scale, dep_ff = _ffn_sizes(d)
    if user_norm is not None and not str(user_norm).startswith(d.norm):
        raise ConvertError(f"--config has norm={user_norm!r} but the checkpoint's norms are {d.norm}")
    return {
        "dim": d.dim,
        "num_layers": d.num_layers,
        "text_card": d.text_out,
        "card": d.audio_vocab - 1,
        "n_q": d.n_q,
        "dep_q": d.dep_q,
        "depformer_dim": d.dep_dim,
        "depformer_num_layers": d.dep_layers,
        "depformer_dim_feedforward": dep_ff,
        "hidden_scale": hidden_scale,
        "gating": "silu" if d.gating else "none",
        "norm": user_norm or ("rms_norm_f32" if d.norm == "rms_norm" else "layer_norm"),
        "depformer_low_rank_embeddings": d.low_rank,
    }


def _kyutai_form(user: dict) -> dict:
    """Our own nested LmConfig.to_dict() form, rewritten in Kyutai's flat keys."""
    if not isinstance(user.get("transformer"), dict):
        return user
    try:
        names = {k: v for k, v in user.items() if k in ("moshi_name", "mimi_name", "tokenizer_name")}
        return {**LmConfig.from_dict(user).to_kyutai_dict(), **names}
    except Exception as e:
        raise ConvertError(f"--config: not a usable LM config ({e})") from None


def _check_user(d: Dims, user: dict, derived: dict[str, Any]) -> None:
    """User values for what the shapes fix must be integers that agree with them."""
    for key in (*SHAPE_KEYS, "depformer_dim_feedforward"):
        if key in user and (not isinstance(user[key], int) or isinstance(user[key], bool)):
            raise ConvertError(f"--config has {key}={user[key]!r}; expected an integer")
    for key in SHAPE_KEYS:
        if key in user and user[key] != derived[key]:
            raise ConvertError(f"--config has {key}={user[key]} but the checkpoint's tensors give {derived[key]}")
    if "depformer_dim_feedforward" in user:
        ff = user["depformer_dim_feedforward"]
        got = ffn_hidden_dim(d.dep_dim, ff, d.gating)
        if got != d.dep_hidden:
            raise ConvertError(
                f"--config has depformer_dim_feedforward={ff} (hidden {got}) but the checkpoint's is {d.dep_hidden}"
            )
        derived["depformer_dim_feedforward"] = ff  # the user's nominal size describes the same hidden size


def _defaults(d: Dims) -> dict[str, Any]:
    """Moshi 7B's values for what the weights do not record."""
    defaults: dict[str, Any] = {
        "num_heads": d.dim // 128,
        "depformer_num_heads": d.dep_dim // 64,
        "context": 3000,
        "max_period": 10000,
        "positional_embedding": "rope",
        "depformer_context": d.dep_q,
        "depformer_max_period": 10000,
        "depformer_pos_emb": "none",
    }
    if d.n_q % d.dep_q == 0:
        defaults["delays"] = [0] + ([0] + [1] * (d.dep_q - 1)) * (d.n_q // d.dep_q)
    return defaults


def _assumed_notes(d: Dims, defaults: dict[str, Any], assumed: list[str]) -> list[str]:
    """One note per assumed value; refuses where no default can be assumed."""
    notes: list[str] = []
    if "num_heads" in assumed:
        if d.dim % 128:
            raise ConvertError(f"the weights do not record num_heads (dim {d.dim}): pass --config with num_heads")
        notes.append(f"num_heads={defaults['num_heads']} (head dim 128)")
    if "depformer_num_heads" in assumed:
        if d.dep_dim % 64:
            raise ConvertError(
                f"the weights do not record depformer_num_heads (dim {d.dep_dim}): pass --config with it"
            )
        notes.append(f"depformer_num_heads={defaults['depformer_num_heads']} (head dim 64)")
    if "delays" in assumed:
        if "delays" not in defaults:
            raise ConvertError("the weights do not record the codebook delays: pass --config with delays")
        notes.append("delays as Moshi 7B (0 for text and each stream's first codebook, 1 for the rest)")
    notes.extend(f"{k}={defaults[k]}" for k in ("context", "max_period", "positional_embedding") if k in assumed)
    return notes


def build_config(d: Dims, user: dict | None = None) -> tuple[LmConfig, dict, list[str]]:
    """LmConfig + Kyutai config.json dict for the checkpoint; user values fill what the shapes don't show.

    Returns (LmConfig, config_json_dict, notes about assumed values).
    """
    if d.text_in != d.text_out + 1:
        raise ConvertError(f"text_emb has {d.text_in} rows but text_linear {d.text_out}: expected text_card + 1")
    derived = _derived(d, (user or {}).get("norm"))
    user = _kyutai_form(dict(user or {}))
    _check_user(d, user, derived)
    defaults = _defaults(d)
    notes = _assumed_notes(d, defaults, [k for k in defaults if k not in user])
    merged = {**defaults, **user, **derived}
    if len(merged["delays"]) != d.n_q + 1:
        raise ConvertError(f"delays has {len(merged['delays'])} entries; expected n_q + 1 = {d.n_q + 1}")
    try:
        cfg = LmConfig.from_dict(merged)
    except Exception as e:
        raise ConvertError(f"cannot build the LM config: {e}") from None
    out = dict(cfg.to_kyutai_dict())
    for k, v in merged.items():
        out.setdefault(k, v)
    return cfg, out, notes
