"""Build-time choice of MLX's backend on Linux (a hatchling metadata hook; see pyproject.toml).

mlx-cpu and mlx-cuda-12/13 each install the same `mlx/lib/libmlx.so`, so an environment must hold exactly one
of them: an extra cannot add CUDA beside the CPU backend that a plain install needs. The backend is therefore
picked when pip builds the package, from MOSHI_MLX_BACKEND:

    pip install -e .                              # Linux: MLX on CPU (macOS: Metal, whatever the variable)
    MOSHI_MLX_BACKEND=cuda12 pip install -e .     # NVIDIA GPU, CUDA 12 driver (cuda13 for CUDA 13)
"""

from __future__ import annotations

import os

from hatchling.metadata.plugin.interface import MetadataHookInterface

BACKEND_ENV = "MOSHI_MLX_BACKEND"


class MlxBackendHook(MetadataHookInterface):
    PLUGIN_NAME = "custom"

    def update(self, metadata: dict) -> None:
        backends: dict[str, str] = self.config["linux-mlx"]
        backend = os.environ.get(BACKEND_ENV, "").strip() or "cpu"
        if backend not in backends:
            raise ValueError(f"{BACKEND_ENV}={backend!r}: expected one of {', '.join(backends)}")
        linux = f"{backends[backend]}; sys_platform != 'darwin'"
        metadata["dependencies"] = [*self.config["dependencies"], linux]
