"""moshi_mlx.cli: the one error policy, exit codes and shared argparse types of every entry point."""

import argparse

import pytest

from moshi_mlx import cli
from moshi_mlx.errors import MoshiError, UsageError
from moshi_mlx.model_files.budget import BudgetError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moshi-test")
    p.add_argument("--n", type=cli.integer(1, 10), default=1)
    cli.add_verbose_arg(p)
    return p


@pytest.mark.parametrize(
    "exc,code,line",
    [
        (MoshiError("the model file is truncated"), 1, "error: the model file is truncated"),
        (UsageError("--demo cannot use -q"), 2, "error: --demo cannot use -q"),
        (FileNotFoundError(2, "No such file or directory", "x.wav"), 1, "error: x.wav: No such file or directory"),
        (ZeroDivisionError("division by zero"), 1, "error: ZeroDivisionError: division by zero"),
        (OSError("PortAudio library not found"), 1, "error: PortAudio library not found"),  # no class name
        (BudgetError("the model needs 9 GB"), 1, "error: the model needs 9 GB"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_one_exit_code_policy(exc, code, line, capsys):
    def body(args):
        raise exc

    assert cli.run(_parser(), body, []) == code
    err = capsys.readouterr().err
    assert err.strip() == line and "Traceback" not in err


def test_verbose_shows_the_traceback_of_an_unexpected_error(capsys):
    def body(args):
        raise ZeroDivisionError("division by zero")

    assert cli.run(_parser(), body, ["-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("error: ZeroDivisionError: division by zero")


def test_bad_flag_is_a_usage_error_before_the_body_runs(capsys):
    ran = []
    with pytest.raises(SystemExit) as e:
        cli.run(_parser(), ran.append, ["--n", "0"])
    assert e.value.code == 2 and not ran
    assert "--n: must be >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["nan", "inf", "-0.5", "x"])
def test_number_refuses_what_sampling_cannot_use(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.number(0.0)(text)


def test_pace_cannot_be_misread():
    assert cli.pace(60, 136.2) == "2.27x slower than real time"
    assert cli.pace(60, 30) == "2.00x faster than real time"
    assert cli.pace(0, 1) == "no timing"


def test_codec_flags_become_a_codec_choice():
    from moshi_mlx.audio.codec_choice import CodecChoice
    from moshi_mlx.cli.flags import add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert CodecChoice.from_args(p.parse_args([])) == CodecChoice(None, None)
    assert CodecChoice.from_args(p.parse_args(["--mimi", "mlx", "--mimi-device", "gpu"])) == CodecChoice("mlx", "gpu")
    with pytest.raises(SystemExit):
        p.parse_args(["--mimi", "torch"])


def test_text_only_flags_given_are_named_in_one_line():
    """The command line's side of the same rule: `local`/`run_inference`/`local_web` say which flags a
    speech-to-text model ignores (pad_mult acts: not named)."""
    from moshi_mlx.cli.flags import note_text_only_flags
    from moshi_mlx.local import build_parser
    from moshi_mlx.settings import TEXT_ONLY_NOTE

    lines: list[str] = []
    note_text_only_flags(build_parser().parse_args(["--text-temperature", "0.9", "--seed", "1", "--pad-mult", "1"]),
                         lines.append)
    assert lines == [f"note: --text-temperature, --seed ignored: {TEXT_ONLY_NOTE}"]
    note_text_only_flags(build_parser().parse_args(["--pad-mult", "1"]), lines.append)
    assert len(lines) == 1
