"""The config.json of a converted checkpoint: what the shapes fix (`Dims`), plus what they cannot show.

The weights do not record the head counts, the context or the codebook delays: a user's config (Kyutai's
config.json, or our own nested `LmConfig.to_dict()` form) fills them, else Moshi 7B's values are assumed and
said so. Pure: no file is read here.
"""

from __future__ import annotations

from typing import Any

from .config import KYUTAI_DEFAULTS, ConfigError, LmConfig, kyutai_feedforward, kyutai_ffn_hidden, kyutai_hidden_scale
from .pytorch import ConvertError, Dims

__all__ = ["SHAPE_KEYS", "build_config"]

#: Keys fixed by the tensor shapes: a --config value for them must agree with the checkpoint.
SHAPE_KEYS = ("dim", "num_layers", "text_card", "card", "n_q", "dep_q", "depformer_dim", "depformer_num_layers")


def _ffn_sizes(d: Dims) -> tuple[float, int | None]:
    """(hidden_scale, depformer_dim_feedforward) as Kyutai's config.json describes the two FFNs (None: no
    depformer, a text-only model)."""
    try:
        return (kyutai_hidden_scale(d.dim, d.hidden, d.gating),
                kyutai_feedforward(d.dep_dim, d.dep_hidden, d.dep_gating) if d.dep_q else None)
    except ConfigError as e:
        raise ConvertError(f"the feed-forward sizes cannot be described in config.json: {e}") from None


def _refined_norm(d_kind: str, user: Any, key: str) -> str:
    """The Kyutai norm name for a kind the shapes show (a user's name may refine it, e.g. rms_norm_f32)."""
    if user is not None:
        if not str(user).startswith(d_kind):
            raise ConvertError(f"--config has {key}={user!r} but the checkpoint's norms are {d_kind}")
        return str(user)
    return "rms_norm_f32" if d_kind == "rms_norm" else "layer_norm"


def _agree(user: dict, key: str, value: Any, shown: str) -> None:
    if key in user and user[key] != value:
        raise ConvertError(f"--config has {key}={user[key]!r} but the checkpoint's tensors give {shown}")


def _check_extra_heads(d: Dims, user: dict) -> None:
    """The user's extra heads must be the checkpoint's."""
    if d.extra_heads:
        _agree(user, "extra_heads_num_heads", d.extra_heads, f"{d.extra_heads} extra heads")
        _agree(user, "extra_heads_dim", d.extra_heads_dim, f"extra heads of size {d.extra_heads_dim}")
    elif user.get("extra_heads_num_heads"):
        raise ConvertError(
            f"--config has extra_heads_num_heads={user['extra_heads_num_heads']!r} but the checkpoint has no extra_heads"
        )


def _derived(d: Dims, user: dict) -> dict[str, Any]:
    """The keys the shapes fix, each checked against the user's value (which may only refine it)."""
    hidden_scale, dep_ff = _ffn_sizes(d)
    gating, dep_gating = ("silu" if d.gating else "none"), ("silu" if d.dep_gating else "none")
    _agree(user, "gating", gating, f"gating={gating!r}")
    _agree(user, "kv_repeat", d.kv_repeat, f"kv_repeat={d.kv_repeat}")
    if d.dep_q:  # a text-only model has no depformer tensors to agree with
        _agree({"depformer_gating": user.get("depformer_gating", user.get("gating", gating))}, "depformer_gating",
               dep_gating, f"depformer_gating={dep_gating!r}")
        _agree({"depformer_kv_repeat": user.get("depformer_kv_repeat", user.get("kv_repeat", d.dep_kv_repeat))},
               "depformer_kv_repeat", d.dep_kv_repeat, f"depformer_kv_repeat={d.dep_kv_repeat}")

    def scale(key: str, present: bool, inherited: Any = None) -> Any:
        given = user.get(key, inherited)
        if present:
            return given if given is not None else 0.01  # the value is only the initial scale; weights hold it
        if given is not None:
            raise ConvertError(f"--config has {key}={given!r} but the checkpoint has no layer_scale tensors")
        return None

    layer_scale = scale("layer_scale", d.layer_scale)
    dep_inherited = user.get("layer_scale") if "depformer_layer_scale" not in user else None
    dep_norm = None
    if d.dep_out_norm is not None:
        dep_norm = _refined_norm(d.dep_out_norm, user.get("depformer_norm"), "depformer_norm")
    elif user.get("depformer_norm") is not None:
        raise ConvertError(f"--config has depformer_norm={user['depformer_norm']!r} but the checkpoint has no depformer_norms")
    if d.dep_q == 0:
        return _text_only_derived(d, user, hidden_scale, gating, layer_scale)
    _check_extra_heads(d, user)
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
        "gating": gating,
        "depformer_gating": dep_gating,
        "kv_repeat": d.kv_repeat,
        "depformer_kv_repeat": d.dep_kv_repeat,
        "layer_scale": layer_scale,
        "depformer_layer_scale": scale("depformer_layer_scale", d.dep_layer_scale, dep_inherited),
        "norm": _refined_norm(d.norm, user.get("norm"), "norm"),
        "depformer_norm": dep_norm,
        "depformer_low_rank_embeddings": d.low_rank,
        "extra_heads_num_heads": d.extra_heads,
        "extra_heads_dim": d.extra_heads_dim if d.extra_heads else user.get("extra_heads_dim", 6),
    }


#: The depformer keys a text-only model's config keeps from the user (they describe no tensor): LMModel's
#: defaults when left out, with one head where it has none (Kyutai never builds that depformer).
_UNUSED_DEPFORMER = {"depformer_dim": KYUTAI_DEFAULTS["depformer_dim"], "depformer_num_heads": 1,
                     "depformer_num_layers": 0}


def _text_only_derived(d: Dims, user: dict, hidden_scale: float, gating: str, layer_scale: Any) -> dict[str, Any]:
    """The shape-fixed keys of a text-only model (dep_q 0): the temporal ones; the depformer's are the user's."""
    _check_extra_heads(d, user)
    if user.get("depformer_norm") is not None:
        raise ConvertError(f"--config has depformer_norm={user['depformer_norm']!r} but the checkpoint has no depformer")
    unused = {k: user.get(k, v) for k, v in _UNUSED_DEPFORMER.items()}
    return {
        "dim": d.dim, "num_layers": d.num_layers, "text_card": d.text_out, "card": d.audio_vocab - 1, "n_q": d.n_q,
        "dep_q": 0, **unused, "hidden_scale": hidden_scale, "gating": gating, "kv_repeat": d.kv_repeat,
        "layer_scale": layer_scale, "norm": _refined_norm(d.norm, user.get("norm"), "norm"),
        "extra_heads_num_heads": d.extra_heads,
        "extra_heads_dim": d.extra_heads_dim if d.extra_heads else user.get("extra_heads_dim", 6),
    }


def _check_conditioners(d: Dims, cfg: LmConfig) -> None:
    """The declared conditioners must be exactly the checkpoint's tables, row for row."""
    stored = {name: (rows, width, padding) for name, rows, width, padding in d.conditioners}
    declared = {c.name: (c.n_bins + 1, c.dim, c.learn_padding) for c in cfg.conditioners}
    for name in stored.keys() - declared.keys():
        raise ConvertError(
            f"the checkpoint has conditioner {name!r}: pass --config with its conditioners and fuser (Kyutai's config.json)"
        )
    for name in declared.keys() - stored.keys():
        raise ConvertError(f"--config declares conditioner {name!r} but the checkpoint has no tensors for it")
    for name, (rows, width, padding) in stored.items():
        if declared[name] != (rows, width, padding):
            raise ConvertError(
                f"conditioners.{name}: the checkpoint's table is {rows} x {width} (learnt padding {padding}), "
                f"--config gives n_bins + 1 = {declared[name][0]}, dim {declared[name][1]}"
            )


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
        if d.dep_q == 0 and key.startswith("depformer_"):
            continue  # a text-only model's depformer keys describe no tensor
        if key in user and user[key] != derived[key]:
            raise ConvertError(f"--config has {key}={user[key]} but the checkpoint's tensors give {derived[key]}")
    if user.get("depformer_dim_feedforward") is not None and d.dep_q:
        ff = user["depformer_dim_feedforward"]
        got = kyutai_ffn_hidden(d.dep_dim, ff, d.dep_gating)
        if got != d.dep_hidden:
            raise ConvertError(
                f"--config has depformer_dim_feedforward={ff} (hidden {got}) but the checkpoint's is {d.dep_hidden}"
            )
        derived["depformer_dim_feedforward"] = ff  # the user's nominal size describes the same hidden size


def _defaults(d: Dims) -> dict[str, Any]:
    """Moshi 7B's values for what the weights do not record."""
    defaults: dict[str, Any] = {
        "num_heads": d.dim // 128,
        "depformer_num_heads": d.dep_dim // 64 if d.dep_q else 1,
        "context": 3000,
        "max_period": 10000,
        "positional_embedding": "rope",
        "depformer_context": d.dep_q,
        "depformer_max_period": 10000,
        "depformer_pos_emb": "none",
    }
    if d.dep_q == 0:
        defaults["delays"] = [0] * (d.n_q + 1)  # Kyutai's speech-to-text models: no stream delayed
    elif d.n_q % d.dep_q == 0:
        defaults["delays"] = [0] + ([0] + [1] * (d.dep_q - 1)) * (d.n_q // d.dep_q)
    return defaults


def _assumed_notes(d: Dims, defaults: dict[str, Any], assumed: list[str]) -> list[str]:
    """One note per assumed value; refuses where no default can be assumed."""
    notes: list[str] = []
    if "num_heads" in assumed:
        if d.dim % 128:
            raise ConvertError(f"the weights do not record num_heads (dim {d.dim}): pass --config with num_heads")
        notes.append(f"num_heads={defaults['num_heads']} (head dim 128)")
    if "depformer_num_heads" in assumed and d.dep_q:
        if d.dep_dim % 64:
            raise ConvertError(
                f"the weights do not record depformer_num_heads (dim {d.dep_dim}): pass --config with it"
            )
        notes.append(f"depformer_num_heads={defaults['depformer_num_heads']} (head dim 64)")
    if "delays" in assumed:
        if "delays" not in defaults:
            raise ConvertError("the weights do not record the codebook delays: pass --config with delays")
        notes.append("delays all 0 (a text-only model, as Kyutai's speech-to-text)" if d.dep_q == 0 else
                     "delays as Moshi 7B (0 for text and each stream's first codebook, 1 for the rest)")
    notes.extend(f"{k}={defaults[k]}" for k in ("context", "max_period", "positional_embedding") if k in assumed)
    return notes


#: Keys whose LMModel default a --config that leaves them out gets, said in a note.
_NOTED_DEFAULTS = ("num_heads", "context", "max_period", "positional_embedding", "depformer_pos_emb")


def build_config(d: Dims, user: dict | None = None) -> tuple[LmConfig, dict, list[str]]:
    """LmConfig + Kyutai config.json dict for the checkpoint; user values fill what the shapes don't show.

    Without a user config the checkpoint is taken for a Moshi 7B release and the weights' blanks get its values
    (as Kyutai's loader does for a repository without config.json); with one, a key it leaves out means
    LMModel's default, as in Kyutai's code. Returns (LmConfig, config_json_dict, notes about assumed values).
    """
    if d.text_in != d.text_out + 1:
        raise ConvertError(f"text_emb has {d.text_in} rows but text_linear {d.text_out}: expected text_card + 1")
    given = user is not None
    user = _kyutai_form(dict(user or {}))
    derived = _derived(d, user)
    _check_user(d, user, derived)
    if given:
        defaults: dict[str, Any] = {}
        notes = [f"{k}={KYUTAI_DEFAULTS[k]!r} (LMModel's default)" for k in _NOTED_DEFAULTS if k not in user]
    else:
        defaults = _defaults(d)
        notes = _assumed_notes(d, defaults, [k for k in defaults if k not in user])
    merged = {**defaults, **user, **derived}
    if "delays" in merged and len(merged["delays"]) != d.n_q + 1:
        raise ConvertError(f"delays has {len(merged['delays'])} entries; expected n_q + 1 = {d.n_q + 1}")
    try:
        cfg = LmConfig.from_dict(merged)
    except ConfigError as e:
        raise ConvertError(f"--config: {e}" if given else str(e)) from None
    _check_conditioners(d, cfg)
    out = dict(cfg.to_kyutai_dict())
    for k, v in merged.items():
        out.setdefault(k, v)
    return cfg, out, notes
