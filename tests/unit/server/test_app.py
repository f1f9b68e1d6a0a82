"""moshi_mlx.server.app without a socket: where the UI is found."""

from __future__ import annotations

import pytest

from moshi_mlx.errors import MoshiError
from moshi_mlx.server.app import WebUiMissing, find_web_dir


def test_web_dir_missing_is_a_clear_error(tmp_path):
    with pytest.raises(WebUiMissing, match="index.html") as caught:
        find_web_dir(tmp_path)
    assert isinstance(caught.value, MoshiError)
    assert (find_web_dir() / "index.html").is_file()


def test_web_dir_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "index.html").write_text("<html></html>")
    monkeypatch.setenv("MOSHI_MLX_WEB_DIR", str(tmp_path))
    assert find_web_dir() == tmp_path.resolve()
