"""The team's shared test material (published-layout manifests, Kyutai's built client), found without
machine paths: $MOSHI_MLX_SHARED, else a `shared/` folder beside the checkout or beside any folder above it."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shared_dir(*parts: str) -> Path | None:
    """`shared/<parts>` if it exists anywhere it is looked for, else None."""
    env = os.environ.get("MOSHI_MLX_SHARED")
    roots = [Path(env)] if env else [parent / "shared" for parent in REPO.parents]
    for root in roots:
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    return None


def find_manifests() -> Path:
    """Published-layout manifests: $MOSHI_MLX_MANIFESTS, else the team's shared folder."""
    if os.environ.get("MOSHI_MLX_MANIFESTS"):
        return Path(os.environ["MOSHI_MLX_MANIFESTS"])
    return shared_dir("manifests") or Path("shared/manifests")
