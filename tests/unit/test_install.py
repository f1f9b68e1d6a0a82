"""What `pip install` asks for: hatchling's own metadata for this checkout (hatch_build.py picks MLX's backend).

mlx-cpu and mlx-cuda-* install the same libmlx.so, so a CUDA install must not also pull the CPU backend."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("hatchling", reason="hatchling comes with the dev extra")
from hatchling.metadata.core import ProjectMetadata
from hatchling.plugin.manager import PluginManager

ROOT = Path(__file__).resolve().parents[2]


def _mlx_requirements(monkeypatch, backend: str | None) -> list[str]:
    if backend is None:
        monkeypatch.delenv("MOSHI_MLX_BACKEND", raising=False)
    else:
        monkeypatch.setenv("MOSHI_MLX_BACKEND", backend)
    deps = ProjectMetadata(str(ROOT), PluginManager()).core.dependencies
    return [d for d in deps if d.startswith("mlx")]


def test_plain_install_is_metal_on_a_mac_and_cpu_on_linux(monkeypatch):
    assert _mlx_requirements(monkeypatch, None) == [
        "mlx>=0.26.5; sys_platform == 'darwin'", "mlx[cpu]>=0.26.5; sys_platform != 'darwin'"]


@pytest.mark.parametrize("backend", ["cuda12", "cuda13"])
def test_nvidia_install_gets_cuda_and_never_the_cpu_backend_beside_it(monkeypatch, backend):
    reqs = _mlx_requirements(monkeypatch, backend)
    assert reqs == ["mlx>=0.26.5; sys_platform == 'darwin'", f"mlx[{backend}]>=0.31.2; sys_platform != 'darwin'"]


def test_an_unknown_backend_stops_the_install(monkeypatch):
    with pytest.raises(ValueError, match="MOSHI_MLX_BACKEND='rocm': expected one of cpu, cuda12, cuda13"):
        _mlx_requirements(monkeypatch, "rocm")
