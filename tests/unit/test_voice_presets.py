"""`python -m moshi_mlx.convert --voices`: NVIDIA's torch presets to safetensors.

tests/fixtures/personaplex/voices.tgz holds two small presets in NVIDIA's layout (`voices/NAME.pt`:
embeddings [5, 1, 1, 32], cache [1, 17, 4]), written with torch.save. Reading them needs torch, which the
test venv may lack: that case is the one-line hint, tested always; the conversion runs where torch is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.convert import main
from moshi_mlx.voices import VoiceError, list_voices, load_voice

ARCHIVE = Path(__file__).resolve().parents[1] / "fixtures" / "personaplex" / "voices.tgz"


def test_without_torch_the_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
    assert main(["--voices", str(ARCHIVE), "--out", str(tmp_path)]) == 1
    assert "pip install 'moshi_mlx[voices]'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_flags_that_do_not_go_together_are_one_line(tmp_path, capsys):
    assert main(["--voices", str(ARCHIVE), "in.safetensors"]) == 2
    assert main(["in.safetensors", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert main(["--voices", str(tmp_path / "none.tgz")]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_the_presets_convert_and_load(tmp_path):
    pytest.importorskip("torch")
    assert main(["--voices", str(ARCHIVE), "--out", str(tmp_path)]) == 0
    assert list_voices(tmp_path) == ["NATF0", "VARM1"]
    voice = load_voice("NATF0", tmp_path)
    assert voice.embeddings.shape == (5, 32) and voice.cache.shape == (17, 4) and voice.cache.dtype == np.int32
    (tmp_path / "junk.tgz").write_bytes(b"not an archive")
    with pytest.raises(VoiceError, match="not a voices archive"):
        from moshi_mlx.voice_presets import convert_voices

        convert_voices(tmp_path / "junk.tgz", tmp_path)
