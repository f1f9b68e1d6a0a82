"""Where the app keeps its own files on this machine, decided once for every platform.

* config (the ``--ssl auto`` certificate): ``~/Library/Application Support/moshi_mlx`` on macOS, else
  ``$XDG_CONFIG_HOME/moshi_mlx`` (default ``~/.config/moshi_mlx``); ``$MOSHI_MLX_CONFIG_DIR`` overrides.
* cache (the demo's stand-in Mimi and tokenizer, remade when missing): ``~/Library/Caches/moshi_mlx`` on
  macOS, else ``$XDG_CACHE_HOME/moshi_mlx`` (default ``~/.cache/moshi_mlx``); the demo's folder is its
  ``demo/``, or ``$MOSHI_MLX_DEMO_DIR``; a model's voice presets unpacked from its archive: its ``voices/``, or
  ``$MOSHI_MLX_VOICE_CACHE``.

Nothing is created here; the users of a folder make it when they write.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["CONFIG_ENV", "DEMO_ENV", "VOICE_CACHE_ENV", "config_dir", "demo_dir", "voices_cache_dir"]

#: Overrides of the folders (tests use them).
CONFIG_ENV = "MOSHI_MLX_CONFIG_DIR"
DEMO_ENV = "MOSHI_MLX_DEMO_DIR"
VOICE_CACHE_ENV = "MOSHI_MLX_VOICE_CACHE"
APP = "moshi_mlx"

#: kind -> (macOS folder under ~/Library, XDG variable, its default)
_KINDS = {
    "config": ("Application Support", "XDG_CONFIG_HOME", "~/.config"),
    "cache": ("Caches", "XDG_CACHE_HOME", "~/.cache"),
}


def _user_dir(kind: str) -> Path:
    mac, xdg, default = _KINDS[kind]
    if sys.platform == "darwin":
        return Path("~/Library").expanduser() / mac / APP
    return Path(os.environ.get(xdg) or default).expanduser() / APP


def config_dir() -> Path:
    """The user's moshi_mlx config folder."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env).expanduser() if env else _user_dir("config")


def demo_dir() -> Path:
    """Where the demo's stand-in files are cached."""
    env = os.environ.get(DEMO_ENV)
    return Path(env).expanduser() if env else _user_dir("cache") / "demo"


def voices_cache_dir() -> Path:
    """Where a model's voice presets archive is unpacked (one folder per archive)."""
    env = os.environ.get(VOICE_CACHE_ENV)
    return Path(env).expanduser() if env else _user_dir("cache") / "voices"
