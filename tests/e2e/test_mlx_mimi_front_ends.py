"""The front ends with the MLX Mimi: chosen with --mimi mlx, and by itself where rustymimi cannot be imported.

rustymimi is made unimportable for a real command by a `rustymimi.py` that raises ImportError, placed first
on PYTHONPATH: what `import rustymimi` does on a Python it has no wheel for.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.audio.frames import SAMPLE_RATE
from tests.helpers.audio_env import base_env, read_wav
from tests.helpers.mimi_signals import speechy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    import soundfile

    path = tmp_path_factory.mktemp("clip") / "in.wav"
    soundfile.write(path, speechy(10, seed=2), SAMPLE_RATE)  # 0.8 s
    return path


def run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def env_with(tmp_path: Path, demo_files, block_rustymimi: bool = False) -> dict:
    paths = [str(ROOT)]
    if block_rustymimi:
        blocker = tmp_path / "blocker"
        blocker.mkdir()
        (blocker / "rustymimi.py").write_text("raise ImportError('No module named rustymimi (blocked by the test)')\n")
        paths.insert(0, str(blocker))
    return base_env(HOME=str(tmp_path), PYTHONPATH=os.pathsep.join(paths),
                    MOSHI_MLX_DEMO_DIR=str(demo_files.mimi_path.parent))


def test_run_inference_with_mimi_mlx(tmp_path, clip, demo_files):
    out = tmp_path / "out.wav"
    r = run(["moshi_mlx.run_inference", "--demo", "--mimi", "mlx", str(clip), str(out)], env_with(tmp_path, demo_files))
    assert r.returncode == 0, r.stderr
    memory = next(line for line in r.stderr.splitlines() if "memory: budget" in line)
    assert "; MLX Mimi 0.3" in memory and "on top" not in memory  # inside MLX's allocator, beside the LM
    x, rate = read_wav(out)
    assert rate == SAMPLE_RATE and x.size == 10 * 1920 and np.isfinite(x).all()


def test_without_the_rust_codec_the_mlx_mimi_runs_with_one_line(tmp_path, clip, demo_files):
    out = tmp_path / "out.wav"
    r = run(["moshi_mlx.run_inference", "--demo", str(clip), str(out)], env_with(tmp_path, demo_files, True))
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "rustymimi" in line]
    assert len(said) == 1 and "cannot be imported" in said[0] and "using the MLX Mimi instead" in said[0], said
    assert out.is_file()


def test_local_offline_demo_with_mimi_mlx(tmp_path, demo_files):
    out = tmp_path / "babble.wav"
    r = run(["moshi_mlx.local", "--demo", "--mimi", "mlx", "--demo-output", str(out)], env_with(tmp_path, demo_files))
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "demo done" in r.stderr


def test_gpu_for_rustymimi_is_refused_before_loading(tmp_path, clip, demo_files):
    r = run(["moshi_mlx.run_inference", "--demo", "--mimi", "rustymimi", "--mimi-device", "gpu", str(clip),
             str(tmp_path / "o.wav")], env_with(tmp_path, demo_files), timeout=120)
    assert r.returncode == 2 and "rustymimi runs on the CPU only" in r.stderr.splitlines()[-1]
    assert "DEMO MODE" not in r.stderr
