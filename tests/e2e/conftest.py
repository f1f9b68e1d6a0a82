"""Fixtures of the end-to-end tests (real sockets, processes, browsers): one warmed demo engine per module,
Chromium, and speech for its fake microphone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.browser import chromium_path
from tests.helpers.web_server import make_speech, write_wav


@pytest.fixture(scope="module")
def engine():
    from moshi_mlx.model_files.assets import load

    assets = load(demo=True, log=lambda msg: None)
    eng = assets.engine()
    eng.warmup()
    yield eng
    eng.close()  # its model thread holds the model: let the module's memory go


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium, or set MOSHI_MLX_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory, chromium) -> Path:
    d = tmp_path_factory.mktemp("mic")
    speech = make_speech(d, 48000)
    silence = np.zeros(24000, np.float32)  # Chromium loops the file: leave a pause between repeats
    return write_wav(d / "speech48k.wav", np.concatenate([speech, silence]), 48000)
