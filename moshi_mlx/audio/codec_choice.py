"""Which Mimi runs: rustymimi (the default where it installs) or the MLX Mimi, and on which device.

``CodecChoice`` is the ``--mimi`` / ``--mimi-device`` flags as one value; ``open_mimi`` builds the codec.
Where rustymimi cannot be imported (no wheel for this Python, or not installed) the MLX Mimi runs
instead, and one line says so.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError
from .mimi import FrameCodec, Mimi
from .mlx_mimi import DEFAULT_DEVICE, DEVICES, MlxMimi

#: The codecs ``--mimi`` takes; the first is the default.
CODECS = ("rustymimi", "mlx")
DEFAULT_CODEC = CODECS[0]


@dataclass(frozen=True)
class CodecChoice:
    """``codec``: "rustymimi" or "mlx" (None: the default); ``device``: "cpu" or "gpu" (MLX only; None: cpu)."""

    codec: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.codec not in (None, *CODECS):
            raise UsageError(f"--mimi must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.device not in (None, *DEVICES):
            raise UsageError(f"--mimi-device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.codec == "rustymimi" and self.device not in (None, "cpu"):
            raise UsageError("--mimi-device gpu needs --mimi mlx: rustymimi runs on the CPU only")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CodecChoice:
        return cls(getattr(args, "mimi", None), getattr(args, "mimi_device", None))


def rustymimi_problem() -> str | None:
    """Why rustymimi cannot be used here, or None when it imports."""
    try:
        import rustymimi  # noqa: F401
    except ImportError as e:
        return str(e) or type(e).__name__
    return None


def open_mimi(
    path: str | os.PathLike,
    num_codebooks: int = 8,
    choice: CodecChoice = CodecChoice(),
    log: Callable[[str], None] | None = None,
) -> FrameCodec:
    """The chosen Mimi for ``path``; rustymimi missing -> the MLX Mimi, with one line through ``log``."""
    codec = choice.codec or (DEFAULT_CODEC if choice.device in (None, "cpu") else "mlx")
    if codec == "rustymimi":
        problem = rustymimi_problem()
        if problem is None:
            return Mimi(path, num_codebooks)
        (log or logging.getLogger("moshi_mlx").warning)(
            f"rustymimi cannot be imported ({problem}): using the MLX Mimi instead"
        )
    return MlxMimi(path, num_codebooks, device=choice.device or DEFAULT_DEVICE)
