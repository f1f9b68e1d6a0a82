"""The README's signs match the rooms: every `moshi_mlx.x.y` it names and every package file its layout table
lists exists, and every module of the package is in that table."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _resolve(dotted: str) -> object:
    """The module or attribute a dotted name means: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
        return value
    raise ModuleNotFoundError(dotted)


NAMED = sorted(set(re.findall(r"`(moshi_mlx(?:\.\w+)+)", README)))


@pytest.mark.parametrize("dotted", NAMED)
def test_every_name_the_readme_gives_exists(dotted):
    assert _resolve(dotted) is not None


def test_the_documented_python_api_imports():
    from moshi_mlx import EngineSettings, ModelSource, load  # noqa: F401  (README: "Python API")

    assert callable(load)


def _layout_rows() -> str:
    start = README.index("## Layout")
    return README[start: README.index("\n## ", start + 1)]


def test_layout_table_lists_every_package_file_and_nothing_else():
    rows = _layout_rows()
    listed = set(re.findall(r"`(moshi_mlx/[\w/]+\.py)`", rows))
    actual = {str(p.relative_to(ROOT)) for p in (ROOT / "moshi_mlx").rglob("*.py") if p.name != "__init__.py"}
    assert not listed - actual, f"the README's layout names files that do not exist: {sorted(listed - actual)}"
    assert not actual - listed, f"files missing from the README's layout: {sorted(actual - listed)}"
