"""Test material found without machine paths: the published-layout manifests (committed under
tests/fixtures/manifests/), and the team's shared material (Kyutai's built client): $MOSHI_MLX_SHARED, else a
`shared/` folder beside the checkout or beside any folder above it."""

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


#: The 7B layout's manifests (tensor names, shapes, dtypes of the published checkpoints; Mimi's too): facts,
#: committed so that a fresh clone checks the 7B layout (each file's "source" says how it was derived).
MANIFESTS = REPO / "tests" / "fixtures" / "manifests"


def find_manifests() -> Path:
    """Published-layout manifests: $MOSHI_MLX_MANIFESTS, else the repository's own (tests/fixtures/manifests/)."""
    if os.environ.get("MOSHI_MLX_MANIFESTS"):
        return Path(os.environ["MOSHI_MLX_MANIFESTS"])
    return MANIFESTS
