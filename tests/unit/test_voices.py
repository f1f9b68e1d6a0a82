"""Voices: preset names, recordings normalised to -24 LUFS, converted presets, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from moshi_mlx.audio.files import write_wav
from moshi_mlx.audio.loudness import integrated_loudness
from moshi_mlx.voices import TARGET_LUFS, Voice, VoiceError, list_voices, load_voice


def _preset(folder, name, frames=3, d=256):
    save_file({"embeddings": np.zeros((frames, d), np.float32), "cache": np.zeros((17, 4), np.int32)},
              str(folder / f"{name}.safetensors"))


def test_presets_are_listed_sorted_and_loaded_by_name(tmp_path):
    for name in ("VARM1", "NATF0"):
        _preset(tmp_path, name)
    (tmp_path / "notes.txt").write_text("x")
    assert list_voices(tmp_path) == ["NATF0", "VARM1"]
    assert list_voices(None) == [] and list_voices(tmp_path / "missing") == []
    voice = load_voice("NATF0", tmp_path)
    assert voice.is_preset and voice.embeddings.shape == (3, 256) and voice.cache.dtype == np.int32
    assert load_voice(str(tmp_path / "VARM1.safetensors"), None).name == "VARM1"


def test_an_unknown_name_lists_the_known_ones(tmp_path):
    _preset(tmp_path, "NATF0")
    with pytest.raises(VoiceError, match="unknown voice 'NATM9'.*known: NATF0"):
        load_voice("NATM9", tmp_path)
    with pytest.raises(VoiceError, match="no voices folder"):
        load_voice("NATF0", None)


def test_a_recording_is_resampled_and_brought_to_minus_24_lufs(tmp_path):
    t = np.arange(16_000 * 2) / 16_000
    write_wav(tmp_path / "me.wav", (0.05 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate=16_000)
    voice = load_voice(str(tmp_path / "me.wav"), None)
    assert not voice.is_preset and voice.pcm.dtype == np.float32
    assert abs(voice.pcm.shape[0] - 48_000) <= 2
    assert integrated_loudness(voice.pcm, 24_000) == pytest.approx(TARGET_LUFS, abs=0.05)


def test_files_that_are_not_voices_get_one_line(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"this is not audio at all")
    with pytest.raises(VoiceError, match="x.wav") as e:
        load_voice(str(tmp_path / "x.wav"), None)
    assert "\n" not in str(e.value)
    with pytest.raises(VoiceError, match="no such file"):
        load_voice(str(tmp_path / "gone.wav"), None)
    (tmp_path / "v.pt").write_bytes(b"torch")
    with pytest.raises(VoiceError, match="convert --voices"):
        load_voice(str(tmp_path / "v.pt"), None)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(VoiceError, match="not a converted preset"):
        load_voice(str(tmp_path / "bad.safetensors"), None)
    save_file({"weights": np.zeros(3, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(VoiceError, match="no cache, embeddings"):
        load_voice(str(tmp_path / "model.safetensors"), None)


def test_a_voice_is_audio_or_embeddings_never_both():
    with pytest.raises(VoiceError):
        Voice("x")
    with pytest.raises(VoiceError):
        Voice("x", pcm=np.zeros(3, np.float32), embeddings=np.zeros((1, 2), np.float32), cache=np.zeros((1, 1)))

