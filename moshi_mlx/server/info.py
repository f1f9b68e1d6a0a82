"""What the web server says about itself in its 0x04 metadata messages.

Kyutai's official web client validates *every* metadata message against its ``ServersInfoSchema``
(sampling numbers, ``lm_model_file``, ``instance_name`` and a ``build_info`` object of ten strings
describing a Rust build) and logs an error for each one that does not match. So every message we send
carries those fields, filled with what is true of this Python server; our own fields ride along (the
official client ignores them).
"""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, Mapping

from .. import __version__
from ..settings import KNOBS, knob_table

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the moshi_mlx package
UNKNOWN = "unknown"


def _git(*args: str) -> str:
    """One line of git output about the checkout the package runs from ("" if not a checkout)."""
    repo = PACKAGE_DIR.parent
    if not (repo / ".git").exists():  # an installed wheel: no repository to ask
        return ""
    try:
        r = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


@functools.lru_cache(maxsize=1)
def build_info() -> dict[str, str]:
    """Kyutai's ``build_info`` fields; the Rust compiler ones describe the Python that runs us."""
    commit = _git("log", "-1", "--format=%H %ct %cI")
    git_hash, git_ts, git_date = (commit.split() + [UNKNOWN] * 3)[:3] if commit else (UNKNOWN,) * 3
    return {
        # This package has no build step of its own: the version is what identifies a build.
        "build_timestamp": UNKNOWN,
        "build_date": UNKNOWN,
        "git_branch": _git("rev-parse", "--abbrev-ref", "HEAD") or UNKNOWN,
        "git_timestamp": git_ts,
        "git_date": git_date,
        "git_hash": git_hash,
        "git_describe": _git("describe", "--always", "--dirty", "--tags") or f"moshi_mlx {__version__}",
        "rustc_host_triple": f"{platform.machine()}-{sys.platform}",
        "rustc_version": f"{platform.python_implementation()} {platform.python_version()} (moshi_mlx {__version__})",
        "cargo_target_triple": sysconfig.get_platform(),
    }


@functools.lru_cache(maxsize=1)
def _mlx() -> dict[str, str]:
    try:
        import mlx.core as mx

        return {"mlx_version": getattr(mx, "__version__", UNKNOWN), "mlx_device": str(mx.default_device())}
    except Exception:  # pragma: no cover - mlx is a dependency
        return {"mlx_version": UNKNOWN, "mlx_device": UNKNOWN}


def sampling_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Kyutai's sampling fields, typed as its schema wants, from the knobs (a knob left out: its default).

    Seeds and the condition are not numbers of Kyutai's schema; our own ``settings`` field in the info message
    carries them.
    """
    return {k.name: k.cast(settings.get(k.name, k.default)) for k in KNOBS.values() if k.kind in ("float", "int")}


def knobs_info(text_only: bool = False) -> list[dict[str, Any]]:
    """The sampling knobs for ``/api/info``: the web UI takes its form's limits from here, and offers only
    these (a text-only model: only the knobs that change its captions)."""
    return knob_table(text_only)


def server_info(settings: Mapping[str, Any], lm_model_file: str, instance_name: str | None = None) -> dict[str, Any]:
    """Every field of Kyutai's ``ServersInfoSchema`` plus ours.

    ``settings`` is the conversation's settings as :meth:`protocol.QueryResult.describe` gives them.
    """
    info: dict[str, Any] = sampling_fields(settings)
    info["lm_model_file"] = lm_model_file or UNKNOWN
    info["instance_name"] = instance_name or f"moshi_mlx on {socket.gethostname()}"
    info["build_info"] = build_info()
    info["moshi_mlx_version"] = __version__
    info.update(_mlx())
    return info
