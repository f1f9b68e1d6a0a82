"""The package's import graph: every module imports only modules of lower layers (no import upwards).

Layers, from the bottom: format and settings facts; single-job libraries (files, codecs, devices, wire
protocol, CLI shell); the model; generation and checkpoint loading; the engine; the one front door
(`assets.load`); shared front-end parts; thin entry points. Read from the source (AST), so it also sees
imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moshi_mlx"

LAYERS: list[set[str]] = [
    {"errors", "frames", "settings", "web_security", "memory", "models", "models.config", "models.cache"},
    {"sampling", "hub", "outputs", "tokenizer", "mimi", "aec", "audio", "audio_files", "tls", "protocol",
     "server_info", "cli", "models.transformer", "budget"},
    {"models.lm", "recording", "remote"},
    {"generate", "loading"},
    {"engine", "demo"},
    {"assets"},
    {"terminal", "run_inference", "convert", "benchmark"},
    {"local", "local_web", "client"},
    {"__main__"},
]


def _layer(module: str) -> int:
    top = "benchmark" if module.startswith("benchmark") else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"moshi_mlx.{module} has no layer in tests/test_layers.py: place it")


def _imports(path: Path) -> set[str]:
    """Package-relative names of the moshi_mlx modules a file imports (at any depth of the code)."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
            if node.module:
                found.add(".".join([*base, node.module]))
            else:  # `from . import cli`
                found.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moshi_mlx."):
            found.add(node.module.removeprefix("moshi_mlx."))
    return {name for name in found if name not in ("", "__version__")}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_upward(path):
    rel = path.relative_to(PACKAGE).with_suffix("")
    me = ".".join(rel.parts if rel.name != "__init__" else rel.parts[:-1])
    mine = _layer(me)
    for target in sorted(_imports(path)):
        if me.startswith("benchmark") and target.startswith("benchmark"):
            continue  # inside the benchmark package its own modules may use each other
        assert _layer(target) < mine or (target == me), (
            f"moshi_mlx.{me} (layer {mine}) imports moshi_mlx.{target} (layer {_layer(target)})"
        )


def test_hub_only_finds_files():
    """hub.py reads no checkpoint: it imports nothing of loading's and nothing of the model."""
    assert _imports(PACKAGE / "hub.py") <= {"errors"}
