"""`moshi_mlx.local` in-process: what it checks before it opens a sound device, and the offline demo's transcript.

sounddevice is replaced by a function that fails the test if called: these checks must come before any device
opens (on a Mac without microphone permission, or without PortAudio, the device error hid the real problem).
"""

from __future__ import annotations

import numpy as np
import pytest

from moshi_mlx import local
from moshi_mlx.audio import device_choice
from moshi_mlx.audio.frames import FRAME_SIZE
from moshi_mlx.clips import converse_stream
from moshi_mlx.settings import EngineSettings


@pytest.fixture
def no_devices(monkeypatch):
    def opened():
        raise AssertionError("a sound device was opened before the model flags and files were checked")

    monkeypatch.setattr(device_choice, "sounddevice_module", opened)


def test_model_files_are_checked_before_the_sound_devices(no_devices, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert local.main(["--moshi-weights", str(missing)]) == 1
    assert capsys.readouterr().err == f"error: --moshi-weights {missing}: no such file\n"


def test_demo_with_a_model_flag_is_a_usage_error_before_anything_opens(no_devices, capsys):
    assert local.main(["--demo", "-q", "4"]) == 2
    assert capsys.readouterr().err == "error: --demo runs built-in stand-ins and cannot use -q: drop one or the other\n"


def test_a_clip_hands_out_its_transcript_as_it_goes(demo_assets_loaded):
    """The offline demo prints each piece when it comes (it printed nothing for ~20 s, then everything)."""
    engine = demo_assets_loaded.engine(EngineSettings(seed=1))
    t = np.arange(30 * FRAME_SIZE) / 24000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)
    out: list[np.ndarray] = []
    seen_at: list[int] = []  # frames answered when each piece arrived
    try:
        pieces = converse_stream(engine, [pcm], out.append, on_text=lambda piece: seen_at.append(len(out)))
    finally:
        engine.close()
    assert pieces and len(seen_at) == len(pieces)
    assert seen_at == [p["frame"] + 1 for p in pieces] and seen_at[0] < len(out)
