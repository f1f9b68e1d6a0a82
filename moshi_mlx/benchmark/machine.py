"""What the benchmark ran on: enough to tell two results apart (OS, chip, memory, MLX version and device)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import mlx.core as mx
import psutil


@dataclass(frozen=True)
class Machine:
    os: str
    chip: str
    machine: str  # arm64, x86_64
    cpu_count: int | None
    memory_gb: float
    python: str
    mlx_version: str
    mlx_device: str  # "gpu" or "cpu"
    mlx_device_info: dict[str, str | int | float]
    moshi_mlx_version: str | None

    def where(self) -> str:
        """How the verdict names this machine."""
        kind = "Mac" if sys.platform == "darwin" else "machine"
        return f"this {kind} ({self.chip}, MLX on {self.mlx_device})"


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _chip() -> str:
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string") or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_info() -> dict[str, str | int | float]:
    try:
        info = mx.device_info()
    except Exception:  # no device_info on some MLX builds / backends
        return {}
    return {str(k): v if isinstance(v, (str, int, float)) else str(v) for k, v in info.items()}


def _os_name() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}".strip()
    return f"{platform.system()} {platform.release()}"


def _own_version() -> str | None:
    try:
        return version("moshi_mlx")
    except PackageNotFoundError:  # running from a checkout without installing
        return None


def machine_info() -> Machine:
    return Machine(
        os=_os_name(),
        chip=_chip(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        memory_gb=round(psutil.virtual_memory().total / 1e9, 1),
        python=platform.python_version(),
        mlx_version=mx.__version__,
        mlx_device="gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu",
        mlx_device_info=_device_info(),
        moshi_mlx_version=_own_version(),
    )
