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

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the moshi_mlx package
UNKNOWN = "unknown"

# Kyutai's text controls, with the values that change nothing. The engine has all three (they are in every
# QueryResult.describe()); these only fill a settings mapping that leaves one out.
NEUTRAL = {"pad_mult": 0.0, "repetition_penalty_context": 0, "repetition_penalty": 1.0}


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


def server_info(settings: Mapping[str, Any], lm_model_file: str, instance_name: str | None = None) -> dict[str, Any]:
    """Every field of Kyutai's ``ServersInfoSchema`` plus ours.

    ``settings`` is the conversation's settings as :meth:`protocol.QueryResult.describe` gives them
    (every one of Kyutai's, this engine applies them all); a text control left out of the mapping is
    reported with its neutral value.
    """
    info: dict[str, Any] = {
        "text_temperature": float(settings["text_temperature"]),
        "text_topk": int(settings["text_topk"]),
        "audio_temperature": float(settings["audio_temperature"]),
        "audio_topk": int(settings["audio_topk"]),
    }
    for name, neutral in NEUTRAL.items():
        value = settings.get(name)
        info[name] = type(neutral)(value) if value is not None else neutral
    info["lm_model_file"] = lm_model_file or UNKNOWN
    info["instance_name"] = instance_name or f"moshi_mlx on {socket.gethostname()}"
    info["build_info"] = build_info()
    info["moshi_mlx_version"] = __version__
    info.update(_mlx())
    return info
