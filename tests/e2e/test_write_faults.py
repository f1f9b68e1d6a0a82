"""Writes that fail half way: `run_inference` under a file-size limit (`ulimit -f`, set with resource.setrlimit in
the child) and into a read-only folder (a read-only bind mount in a private user and mount namespace, `unshare
-rm`: a chmod would not stop root). Each ends with one line, no output file and no temporary file left, and the
input untouched. (The recorder under the same limit: tests/unit/audio/test_recording.py.)"""

from __future__ import annotations

import hashlib
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.audio_env import ROOT, base_env
from tests.helpers.web_server import write_wav


@pytest.fixture(scope="module")
def env() -> dict:
    """The demo's assets exist before any limit applies (their first making writes hundreds of MB)."""
    from moshi_mlx.model_files.stand_ins import demo_assets

    e = base_env()
    demo_assets(Path(e["MOSHI_MLX_DEMO_DIR"]))
    return e


def speech(path: Path, seconds: float = 3.0) -> Path:
    t = np.arange(int(seconds * 24000)) / 24000
    return write_wav(path, (0.3 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32),
                     24000)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(cmd: list[str], env: dict, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_run_inference_past_a_file_size_limit(env, tmp_path):
    src = speech(tmp_path / "in.wav")  # 3 s: Moshi's answer is 144 KB of WAV
    before = digest(src)
    out = tmp_path / "out" / "answer.wav"
    out.parent.mkdir()
    r = run([sys.executable, "-m", "moshi_mlx.run_inference", "--demo", str(src), str(out),
             "--transcript", str(out.with_suffix(".json"))], env, fsize=60_000)
    err = r.stderr.strip()
    print(f"\nulimit -f 60000 (bytes): exit {r.returncode}: {[x for x in err.splitlines() if 'error' in x]}")
    assert r.returncode == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}: cannot be written ("), err
    assert "File too large: the file size limit (ulimit -f) is 60000 bytes" in errors[0], err
    assert list(out.parent.iterdir()) == []  # neither the answer nor a temporary file
    assert digest(src) == before


def test_run_inference_into_a_read_only_folder(env, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare with user namespaces (util-linux) to make a read-only mount without root")
    src = speech(tmp_path / "in.wav", 1.0)
    before = digest(src)
    folder = tmp_path / "ro"
    folder.mkdir()
    script = (f'mount --bind "{folder}" "{folder}" && mount -o remount,ro,bind "{folder}" && '
              f'exec "{sys.executable}" -m moshi_mlx.run_inference --demo "{src}" "{folder}/answer.wav"')
    r = run(["unshare", "-rm", "sh", "-c", script], env)
    err = r.stderr.strip()
    print(f"\nread-only folder: exit {r.returncode}: {err}")
    assert r.returncode == 1 and len(err.splitlines()) == 1, err  # refused before the model loads
    assert "not writable" in err and "Read-only file system" in err, err
    assert list(folder.iterdir()) == [] and digest(src) == before
