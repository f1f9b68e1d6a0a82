"""The MLX Mimi behind the frame API, and the choice between it and rustymimi (with the fallback)."""

import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.audio.codec_choice import CodecChoice, open_mimi
from moshi_mlx.audio.mimi import MimiInputError
from moshi_mlx.audio.mimi_pool import MimiError
from moshi_mlx.audio.mlx_mimi import MlxMimi
from moshi_mlx.codec.transformer import REBASE_POSITIONS
from moshi_mlx.errors import MoshiError
from tests.helpers.mimi_signals import speechy


@pytest.fixture(scope="module")
def mimi(mimi_path):
    m = MlxMimi(mimi_path)
    yield m
    m.close()


def test_frames_and_clips(mimi):
    pcm = speechy(4, seed=1)
    codes = mimi.encode(pcm)
    assert codes.shape == (8, 4) and codes.dtype == np.uint32
    mimi.reset()
    again = np.stack([mimi.encode_frame(f) for f in pcm.reshape(-1, 1920)], -1)
    np.testing.assert_array_equal(again, codes)  # a reset starts afresh
    out = mimi.decode_frame(codes[:, 0])
    assert out.shape == (1920,) and out.dtype == np.float32 and np.isfinite(out).all()
    assert mimi.decode(codes).shape == (4 * 1920,)


def test_bad_input_is_refused_and_the_stream_goes_on(mimi):
    with pytest.raises(MimiInputError, match="shape"):
        mimi.encode_frame(np.zeros(100, np.float32))
    with pytest.raises(MimiInputError, match=r"\[0, 2048\)"):
        mimi.decode_frame(np.full(8, 2048))
    assert mimi.encode_frame(np.zeros(1920, np.float32)).shape == (8,)


def test_both_directions_from_two_threads(mimi):
    """The engine's pipeline encodes on one thread and decodes on another; each direction has its own lane."""
    mimi.reset()
    errors, codes = [], np.zeros(8, np.int64)

    def run(fn):
        try:
            for _ in range(3):
                fn()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(lambda: mimi.encode_frame(speechy(1)),)),
               threading.Thread(target=run, args=(lambda: mimi.decode_frame(codes),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_memory_is_one_weight_copy_and_two_fixed_streams(mimi):
    before = mimi.resident_bytes
    for _ in range(3):
        mimi.encode_frame(np.zeros(1920, np.float32))
    assert mimi.resident_bytes == before == mimi.mlx_bytes
    assert 0.30e9 < before < 0.40e9 and mimi.live_instances == 1


def test_missing_file_and_bad_arguments(tmp_path, mimi_path):
    with pytest.raises(MimiError, match="not found"):
        MlxMimi(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="num_codebooks"):
        MlxMimi(mimi_path, 33)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(MimiError, match="cannot load Mimi weights") as e:
        MlxMimi(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)


def test_choice_is_checked():
    with pytest.raises(MoshiError, match="--mimi must be one of"):
        CodecChoice("torch")
    with pytest.raises(MoshiError, match="rustymimi runs on the CPU only"):
        CodecChoice("rustymimi", "gpu")


def test_choosing_mlx(mimi_path):
    with open_mimi(mimi_path, 8, CodecChoice("mlx")) as m:
        assert isinstance(m, MlxMimi) and m.device == "cpu"


def test_missing_rustymimi_falls_back_with_one_line(mimi_path, monkeypatch):
    """rustymimi made unimportable (as on a Python it has no wheel for): the MLX Mimi, and one line saying so."""
    monkeypatch.setitem(sys.modules, "rustymimi", None)
    lines: list[str] = []
    with open_mimi(mimi_path, 8, CodecChoice(), log=lines.append) as m:
        assert isinstance(m, MlxMimi)
    assert len(lines) == 1 and "rustymimi cannot be imported" in lines[0] and "MLX Mimi" in lines[0]


def test_without_rustymimi_a_whole_process_loads_the_demo(tmp_path, demo_files):
    """A fresh interpreter in which `import rustymimi` fails runs load(demo=True) on the MLX Mimi."""
    code = (
        "import sys; sys.modules['rustymimi'] = None\n"
        "from moshi_mlx.model_files.assets import load\n"
        "a = load(demo=True, log=print)\n"
        "print(type(a.mimi).__name__, a.mimi.encode_frame(__import__('numpy').zeros(1920, 'float32')).shape)\n"
    )
    env = {**__import__("os").environ, "MOSHI_MLX_DEMO_DIR": str(demo_files.mimi_path.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "rustymimi cannot be imported" in out.stdout and "MlxMimi (8,)" in out.stdout


def test_a_stream_started_late_crosses_the_positions_move_back_unchanged(mimi):
    """Streams started 3 frames before their positions move back (2^17 positions, 87 min of audio in) give
    what streams started at 0 give, and keep their size: the move back is reached here in seconds."""
    first_move = 2 * REBASE_POSITIONS // mimi.net.cfg.downsample_stride  # frames
    pcm = speechy(6, seed=3).reshape(-1, 1920)

    def run() -> tuple[np.ndarray, np.ndarray]:
        codes = np.stack([mimi.encode_frame(f) for f in pcm])
        return codes, np.concatenate([mimi.decode_frame(c) for c in codes])

    mimi.reset()
    codes0, audio0 = run()
    size = mimi.resident_bytes
    mimi.start_at(first_move - 3)
    codes1, audio1 = run()
    assert mimi._enc.window.rebased == mimi._dec.window.rebased == REBASE_POSITIONS  # it did move back
    assert mimi.resident_bytes == size
    assert (codes1 == codes0).mean() >= 0.95  # float32 rotary angles near 2^17 round a little differently
    snr = 10 * np.log10(np.sum(audio0**2) / np.sum((audio1 - audio0) ** 2))
    assert snr > 30, snr
    mimi.reset()


def test_the_memory_plan_counts_the_mlx_mimis_real_peak(demo_files):
    """MLX's own peak counter around loading the MLX Mimi and running both directions at once (two threads, as
    the engine does) stays within what the codec reports, and the memory plan's line counts that figure."""
    from moshi_mlx.model_files.assets import load
    from moshi_mlx.model_files.budget import GB

    assets = load(demo=True, log=lambda s: None, codec=CodecChoice("mlx"))
    m = assets.mimi
    m.close()  # the real measurement below is of a fresh one, from nothing
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    m = assets.mimi = MlxMimi(m.path)
    pcm = speechy(4, seed=4).reshape(-1, 1920)
    codes = [m.encode_frame(f) for f in pcm]
    both = [threading.Thread(target=lambda: [m.encode_frame(f) for f in pcm]),
            threading.Thread(target=lambda: [m.decode_frame(c) for c in codes])]
    for t in both:
        t.start()
    for t in both:
        t.join()
    real = mx.get_peak_memory() - base
    assert real <= m.mlx_bytes <= 1.10 * real, (real, m.mlx_bytes)  # all counted, and not grossly over
    lines: list[str] = []
    plan = assets.plan_memory(4.0, log=lines.append)
    assert plan.codec_bytes == m.mlx_bytes and plan.mlx_limit_bytes == plan.budget_bytes + m.mlx_bytes
    assert f"MLX Mimi {m.mlx_bytes / GB:.2f} GB beside it" in lines[0] and "on top" not in lines[0]
    m.close()
