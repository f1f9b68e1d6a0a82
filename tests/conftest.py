import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
MANIFESTS = Path(os.environ.get("MOSHI_MLX_MANIFESTS", SHARED / "manifests"))


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    if not (MANIFESTS / "moshi-7b-mlx-bf16.json").is_file():
        pytest.skip(f"published-layout manifests not found in {MANIFESTS} (set MOSHI_MLX_MANIFESTS)")
    return MANIFESTS
