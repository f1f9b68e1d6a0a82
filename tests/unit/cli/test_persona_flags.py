"""The persona flags (cli/flags.py's shared group) on `local` and `run_inference`."""

from __future__ import annotations

import pytest

from moshi_mlx.cli.flags import check_persona_args, persona_from_args, settings_from_args
from moshi_mlx.errors import UsageError
from moshi_mlx.voices import VoiceError


@pytest.fixture(params=["local", "run_inference"])
def parse(request):
    if request.param == "local":
        from moshi_mlx.local import build_parser

        return lambda *a: build_parser().parse_args(["--demo", *a])
    from moshi_mlx.run_inference import build_parser

    return lambda *a: build_parser().parse_args(["in.wav", "out.wav", "--demo", *a])


def test_the_prompt_and_voice_reach_the_settings(parse, tmp_path):
    role = tmp_path / "role.txt"
    role.write_text("You are Ada.\nYou like maps.\n", encoding="utf-8")
    s = settings_from_args(parse("--text-prompt-file", str(role), "--voice", "NATF2"))
    assert s.text_prompt == "You are Ada.\nYou like maps.\n" and s.voice == "NATF2" and s.has_prompt
    assert settings_from_args(parse("--text-prompt", "Be brief.")).text_prompt == "Be brief."
    assert not settings_from_args(parse()).has_prompt


def test_text_and_text_file_exclude_each_other(parse, capsys):
    with pytest.raises(SystemExit) as e:
        parse("--text-prompt", "a", "--text-prompt-file", "b")
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_bad_persona_flags_are_one_line(parse, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UsageError, match="empty"):
        persona_from_args(parse("--text-prompt-file", str(tmp_path / "empty.txt")))
    with pytest.raises(UsageError, match="cannot be read"):
        persona_from_args(parse("--text-prompt-file", str(tmp_path / "nope.txt")))
    with pytest.raises(UsageError, match="no such folder"):
        check_persona_args(parse("--voices-dir", str(tmp_path / "nope")))
    with pytest.raises(VoiceError, match="no such file"):
        check_persona_args(parse("--voice", str(tmp_path / "gone.wav")))
    check_persona_args(parse("--voice", "NATF2"))  # a bare name waits for the model's presets


def test_local_refuses_a_missing_voice_before_any_device_or_model(tmp_path, capsys):
    from moshi_mlx.local import main

    assert main(["--demo", "--voice", str(tmp_path / "gone.wav")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "gone.wav: no such file" in err[-1] and not any("DEMO MODE" in line for line in err)
