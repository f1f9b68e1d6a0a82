"""moshi_mlx.places: the user's config and cache folders, one decision per platform (the demo cached in ~/.cache
on a Mac while TLS lived in ~/Library/Application Support)."""

from __future__ import annotations

import sys
from pathlib import Path

from moshi_mlx.model_files.stand_ins import default_cache_dir
from moshi_mlx.net.tls import default_cert_dir
from moshi_mlx.places import CONFIG_ENV, DEMO_ENV, config_dir, demo_dir


def test_macos_keeps_everything_under_library(monkeypatch, tmp_path):
    for name in (CONFIG_ENV, DEMO_ENV, "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "darwin")
    library = tmp_path / "Library"
    assert config_dir() == library / "Application Support" / "moshi_mlx"
    assert default_cert_dir() == library / "Application Support" / "moshi_mlx" / "tls"
    assert demo_dir() == default_cache_dir() == library / "Caches" / "moshi_mlx" / "demo"


def test_elsewhere_the_xdg_folders_and_their_defaults(monkeypatch, tmp_path):
    for name in (CONFIG_ENV, DEMO_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "conf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert config_dir() == tmp_path / "conf" / "moshi_mlx" and demo_dir() == tmp_path / "cache" / "moshi_mlx" / "demo"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert config_dir() == tmp_path / ".config" / "moshi_mlx" and demo_dir() == tmp_path / ".cache" / "moshi_mlx" / "demo"


def test_the_overrides_win(monkeypatch, tmp_path):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "c"))
    monkeypatch.setenv(DEMO_ENV, str(tmp_path / "d"))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert config_dir() == tmp_path / "c" and demo_dir() == tmp_path / "d"
    assert not Path(tmp_path / "c").exists()  # nothing made here
