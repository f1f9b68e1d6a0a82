"""Outputs never destroy inputs and never appear half written (moshi_mlx.outputs), through the real
``run_inference`` command line: every refusal happens before the model loads and leaves the input's
bytes as they were; an interrupted run leaves no file behind and an older output untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from moshi_mlx.audio.files import AudioReader
from moshi_mlx.outputs import OutputError, atomic_output, check_outputs
from tests.helpers.audio_env import ROOT, base_env


def _tone(path: Path, seconds: float, rate: int = 16000, channels: int = 1) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
    sf.write(path, np.repeat(x[:, None], channels, axis=1), rate, subtype="PCM_16")
    return path


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moshi_mlx.run_inference", *args, "--demo"], env=base_env(), cwd=ROOT,
        capture_output=True, text=True, timeout=timeout,
    )


def _refused(r: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 1 with one `error:` line mentioning ``needle``, and no model loaded."""
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "DEMO MODE" not in r.stderr and "Traceback" not in r.stderr


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.fixture
def recording(tmp_path) -> tuple[Path, bytes]:
    src = _tone(tmp_path / "interview.wav", 1.0)
    return src, src.read_bytes()


# ------------------------------------------------------------------------------------------------
# Refusals, before any work
# ------------------------------------------------------------------------------------------------


def test_output_is_the_input(recording):
    src, before = recording
    _refused(_cli(str(src), str(src)), "is the input file")
    assert src.read_bytes() == before


def test_output_is_a_symlink_or_hard_link_to_the_input(recording, tmp_path):
    src, before = recording
    (tmp_path / "link.wav").symlink_to(src)
    os.link(src, tmp_path / "hard.wav")
    (tmp_path / "sub").mkdir()
    for out in (tmp_path / "link.wav", tmp_path / "hard.wav", tmp_path / "sub" / ".." / "interview.wav"):
        _refused(_cli(str(src), str(out)), "is the input file")
    assert src.read_bytes() == before


def test_transcript_is_the_input_or_the_output(recording, tmp_path):
    src, before = recording
    _refused(_cli(str(src), str(tmp_path / "out.wav"), "--transcript", str(src)), "is the input file")
    _refused(_cli(str(src), str(tmp_path / "out.wav"), "--transcript", str(tmp_path / "out.wav")), "is also the output")
    assert src.read_bytes() == before and not (tmp_path / "out.wav").exists()


def test_output_folder_missing_unwritable_or_a_directory(recording, tmp_path):
    src, before = recording
    _refused(_cli(str(src), str(tmp_path / "nodir" / "out.wav")), "does not exist")
    _refused(_cli(str(src), str(tmp_path)), "is a directory")
    if os.geteuid() == 0:  # root writes through permission bits: use a folder nobody can write to
        locked = Path("/proc")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
    _refused(_cli(str(src), str(locked / "out.wav")), "is not writable")
    _refused(_cli(str(src), str(tmp_path / "out.wav"), "--transcript", str(locked / "t.json")), "is not writable")
    assert src.read_bytes() == before
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------
# Interrupted runs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_no_file_and_keeps_the_old_one(tmp_path, sig):
    src = _tone(tmp_path / "long.wav", 60.0)  # far longer than the run is allowed to go on
    before = src.read_bytes()
    old_out = tmp_path / "answer.wav"
    old_out.write_bytes(b"an earlier answer the user kept")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi_mlx.run_inference", str(src), str(old_out), "--transcript",
         str(tmp_path / "t.json"), "--demo"], env=base_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    try:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until frames are being written
            line = proc.stderr.readline()
            seen.append(line)
            if line.startswith("moshi: ") or not line:
                break
        assert any(s.startswith("moshi: ") for s in seen), "".join(seen)
        assert any(p.name.startswith(".answer.wav.") for p in tmp_path.iterdir()), "no temporary file in use"
        proc.send_signal(sig)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest and "Exception ignored" not in rest
    assert old_out.read_bytes() == b"an earlier answer the user kept"
    assert not (tmp_path / "t.json").exists() and src.read_bytes() == before
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------
# The module itself
# ------------------------------------------------------------------------------------------------


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full, say")
    assert target.read_text() == "old"
    _no_leftovers(tmp_path)
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block completes
    assert target.read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    _no_leftovers(tmp_path)


def test_atomic_output_through_a_symlink_writes_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "f.txt"
    target.write_text("old")
    (tmp_path / "link.txt").symlink_to(target)
    (out,) = check_outputs(inputs=[], outputs=[tmp_path / "link.txt"])
    with atomic_output(out) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "link.txt").is_symlink() and target.read_text() == "new"


def test_check_outputs_messages_are_one_line(tmp_path):
    a = tmp_path / "a.wav"
    a.write_bytes(b"x")
    for inputs, outputs, needle in [
        ([a], [a], "is the input file"),
        ([], [tmp_path / "b", tmp_path / "x" / ".." / "b"], "is also the output"),
        ([], [tmp_path], "is a directory"),
        ([], [tmp_path / "no" / "b"], "does not exist"),
    ]:
        with pytest.raises(OutputError, match=needle) as e:
            check_outputs(inputs=inputs, outputs=outputs)
        assert "\n" not in str(e.value)
    assert check_outputs(inputs=[a, None], outputs=[tmp_path / "b", None]) == [tmp_path.resolve() / "b"]


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate,channels", [(44100, 2), (8000, 1), (24000, 1)])
def test_reader_streams_in_small_blocks_to_the_exact_length(tmp_path, rate, channels):
    import soxr
    src = _tone(tmp_path / "in.wav", 30.0, rate, channels)
    with AudioReader(src) as r:
        sizes = []
        pieces = []
        for block in r.blocks_24k(size=4096):
            sizes.append(block.size)
            pieces.append(block)
        n = r.frames
    got = np.concatenate(pieces)
    assert got.size == round(n * 24000 / rate)  # exactly the input's duration
    assert max(sizes) <= 2 * 4096 * 24000 / rate + 1024  # blocks stay small (soxr batches a little)
    whole, _ = sf.read(src, dtype="float32", always_2d=True)
    ref = soxr.resample(whole.mean(axis=1), rate, 24000)
    m = min(ref.size, got.size)
    assert np.abs(got[:m] - ref[:m]).max() < 1e-3  # the same signal as resampling the whole file


def test_transcript_goes_to_stdout_without_transcript_flag(recording, tmp_path):
    src, _ = recording
    with_json = _cli(str(src), str(tmp_path / "a.wav"), "--transcript", str(tmp_path / "t.json"), "--seed", "5")
    plain = _cli(str(src), str(tmp_path / "b.wav"), "--seed", "5")
    assert with_json.returncode == 0 and plain.returncode == 0, plain.stderr
    text = json.loads((tmp_path / "t.json").read_text())["text"]
    assert text and with_json.stdout == ""
    assert plain.stdout == text + "\n"


def test_fresh_path_never_names_an_existing_file(tmp_path):
    from moshi_mlx.outputs import fresh_path

    when = time.mktime((2025, 3, 4, 5, 6, 7, 0, 0, -1))
    first = fresh_path(tmp_path, "moshi-demo", ".wav", when)
    assert first == tmp_path / "moshi-demo-20250304-050607.wav"
    first.write_bytes(b"x")
    (tmp_path / "moshi-demo-20250304-050607-2.wav").symlink_to(tmp_path / "gone")  # a dangling link counts
    assert fresh_path(tmp_path, "moshi-demo", ".wav", when) == tmp_path / "moshi-demo-20250304-050607-3.wav"


def test_fresh_paths_keep_a_group_together(tmp_path):
    """A recording's files share one name: if any of the group exists, the whole group moves on."""
    from moshi_mlx.outputs import fresh_paths

    first = fresh_paths(tmp_path, "moshi", ["-a.wav", "-b.txt"], when=0)
    first[1].write_text("taken")  # only the second of the group
    second = fresh_paths(tmp_path, "moshi", ["-a.wav", "-b.txt"], when=0)
    assert [p.name for p in second] == [p.name.replace("-a.wav", "-2-a.wav").replace("-b.txt", "-2-b.txt") for p in first]
