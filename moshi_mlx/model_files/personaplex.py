"""NVIDIA's PersonaPlex (`nvidia/personaplex-7b-v1`): what its hub repository holds and its checkpoint's layout.

Facts from NVIDIA/personaplex (moshi/moshi/models/loaders.py and server.py): the repo serves Kyutai's file
names (`model.safetensors`, the Mimi and tokenizer files of Moshi 7B), a `config.json` its own server downloads
only to count downloads (never read), and `voices.tgz`, a `voices/` folder of the 18 preset voices. The LM is
Moshi 7B with `dep_q` 16 (its depformer also predicts the user's stream); a conversation uses the first 8 steps.
Its checkpoint keeps the older stacked attention names (`self_attn.in_proj_weight`, `out_proj.weight`, one row
block per depformer step), so it holds 475 tensors: Kyutai's 7B plus depformer steps 8-15.

This module only states those facts; `hub.py` fetches the files and `checkpoint.py` loads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEP_Q",
    "FULL_DIMS",
    "GATED_HINT",
    "MODEL_TYPE",
    "PRESETS",
    "REPO",
    "VOICES_ARCHIVE",
    "VOICES_FOLDER",
    "LayoutDims",
    "layout",
    "predicts_both_streams",
]

REPO = "nvidia/personaplex-7b-v1"
#: Its config's `model_type` here (the repo's config.json is not read: see hub.KNOWN_REPOS).
MODEL_TYPE = "personaplex"
#: The voice presets' archive in the repo, and the folder it unpacks to.
VOICES_ARCHIVE = "voices.tgz"
VOICES_FOLDER = "voices"
#: The preset names NVIDIA ships (its client offers them as NAME.pt).
PRESETS = tuple(
    [f"NATF{i}" for i in range(4)] + [f"NATM{i}" for i in range(4)]
    + [f"VARF{i}" for i in range(5)] + [f"VARM{i}" for i in range(5)]
)
#: Depformer steps in the checkpoint (a conversation keeps the first `LmConfig.dep_q`, 8).
DEP_Q = 16
#: What a gated repository needs, said in the one line a download without a token gets.
GATED_HINT = ("accept the licence on https://huggingface.co/{repo} (logged in), then log in here with "
              "`huggingface-cli login` or set HF_TOKEN")


@dataclass(frozen=True)
class LayoutDims:
    """The sizes that name and shape the checkpoint's tensors (Kyutai's 7B at full size)."""

    dim: int = 4096
    num_layers: int = 32
    hidden: int = 11264  # the gated feed-forward's half width (linear_in has twice as many rows)
    text_card: int = 32000
    card: int = 2048
    n_q: int = 16
    dep_q: int = DEP_Q
    dep_dim: int = 1024
    dep_layers: int = 6
    dep_hidden: int = 2816


FULL_DIMS = LayoutDims()


def layout(d: LayoutDims = FULL_DIMS) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in PersonaPlex's checkpoint at sizes `d` (475 at full size)."""
    s: dict[str, tuple[int, ...]] = {
        "text_emb.weight": (d.text_card + 1, d.dim),
        "text_linear.weight": (d.text_card, d.dim),
        "out_norm.alpha": (1, 1, d.dim),
        "depformer_text_emb.weight": (d.text_card + 1, d.dep_dim),
    }
    for i in range(d.n_q):
        s[f"emb.{i}.weight"] = (d.card + 1, d.dim)
    for layer in range(d.num_layers):
        p = f"transformer.layers.{layer}"
        s[f"{p}.self_attn.in_proj_weight"] = (3 * d.dim, d.dim)
        s[f"{p}.self_attn.out_proj.weight"] = (d.dim, d.dim)
        s[f"{p}.norm1.alpha"] = s[f"{p}.norm2.alpha"] = (1, 1, d.dim)
        s[f"{p}.gating.linear_in.weight"] = (2 * d.hidden, d.dim)
        s[f"{p}.gating.linear_out.weight"] = (d.dim, d.hidden)
    for k in range(d.dep_q):
        s[f"depformer_in.{k}.weight"] = (d.dep_dim, d.dim)
        s[f"linears.{k}.weight"] = (d.card, d.dep_dim)
        if k:
            s[f"depformer_emb.{k - 1}.weight"] = (d.card + 1, d.dep_dim)
    for layer in range(d.dep_layers):
        p = f"depformer.layers.{layer}"
        # one row block per step, stacked (the older attention names)
        s[f"{p}.self_attn.in_proj_weight"] = (d.dep_q * 3 * d.dep_dim, d.dep_dim)
        s[f"{p}.self_attn.out_proj.weight"] = (d.dep_q * d.dep_dim, d.dep_dim)
        s[f"{p}.norm1.alpha"] = s[f"{p}.norm2.alpha"] = (1, 1, d.dep_dim)
        for k in range(d.dep_q):
            s[f"{p}.gating.{k}.linear_in.weight"] = (2 * d.dep_hidden, d.dep_dim)
            s[f"{p}.gating.{k}.linear_out.weight"] = (d.dep_dim, d.dep_hidden)
    return s


def predicts_both_streams(names: Iterable[str], generated: int, streams: int) -> bool:
    """A PyTorch-layout checkpoint whose depformer has a step for every codebook of both streams (PersonaPlex's 16
    for 8 + 8) while the model generates Moshi's only: PersonaPlex's layout, wherever the file comes from."""
    steps = sum(1 for name in names if re.fullmatch(r"linears\.\d+\.weight", name))
    return steps == streams == 2 * generated
