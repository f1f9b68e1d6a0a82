"""Tests of moshi_mlx.audio.mimi against the real rustymimi, on a random-weight Mimi checkpoint.

rustymimi costs ~40 ms per frame and direction on a small CPU, so runs stay short. Without rustymimi (a
Python it has no wheel for) the whole module skips: the MLX Mimi's tests cover the codec there.
"""

import threading
from pathlib import Path

import numpy as np
import pytest

rustymimi = pytest.importorskip("rustymimi", reason="rustymimi is not installed (no wheel for this Python?)")

from moshi_mlx.audio.frames import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.audio.mimi import CODEBOOK_SIZE, Mimi, MimiInputError
from moshi_mlx.audio.mimi_pool import MimiError
from tests.helpers.mimi_signals import speechy


@pytest.fixture(scope="module")
def mimi(mimi_path):
    m = Mimi(mimi_path)
    yield m
    m.close()




def rel_rms(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / max(np.mean(b**2), 1e-30)))


# --------------------------------------------------------------------------------------------------
# Basic API
# --------------------------------------------------------------------------------------------------


def test_constants():
    assert SAMPLE_RATE == 24000 and FRAME_SIZE == 1920 and FRAME_RATE == 12.5
    assert SAMPLE_RATE / FRAME_SIZE == FRAME_RATE
    assert CODEBOOK_SIZE == 2048


def test_frame_shapes_and_dtypes(mimi):
    mimi.reset()
    x = speechy(3)
    for i in range(3):
        codes = mimi.encode_frame(x[i * FRAME_SIZE : (i + 1) * FRAME_SIZE])
        assert codes.shape == (8,) and codes.dtype == np.uint32
        assert (codes < CODEBOOK_SIZE).all()
        pcm = mimi.decode_frame(codes)
        assert pcm.shape == (FRAME_SIZE,) and pcm.dtype == np.float32
        assert np.isfinite(pcm).all()
    mimi.reset()


def test_inputs_are_converted(mimi):
    """float64, batch-shaped, non-contiguous pcm and any integer codes are accepted."""
    mimi.reset()
    x = speechy(1, seed=1)
    ref = mimi.encode_frame(x)
    mimi.reset()
    wide = np.zeros(2 * FRAME_SIZE, np.float64)
    wide[::2] = x
    for variant in (x.astype(np.float64), x.reshape(1, FRAME_SIZE), x.reshape(1, 1, FRAME_SIZE), wide[::2]):
        mimi.reset()
        np.testing.assert_array_equal(mimi.encode_frame(variant), ref)
    for codes in (ref.astype(np.int64), ref.astype(np.int32), ref.reshape(1, 8, 1), list(map(int, ref))):
        assert mimi.decode_frame(codes).shape == (FRAME_SIZE,)
    mimi.reset()


@pytest.mark.parametrize(
    "pcm, match",
    [
        (np.zeros(1000, np.float32), r"shape \(1920,\)"),
        (np.zeros((2, FRAME_SIZE), np.float32), r"shape \(1920,\)"),
        (np.zeros(FRAME_SIZE, np.int16), "floating point"),
        (np.full(FRAME_SIZE, np.nan, np.float32), "NaN"),
    ],
)
def test_bad_pcm_is_rejected(mimi, pcm, match):
    with pytest.raises(MimiInputError, match=match) as info:
        mimi.encode_frame(pcm)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "codes, match",
    [
        (np.zeros(7, np.uint32), r"shape \(8,\)"),
        (np.zeros((8, 2), np.uint32), r"shape \(8,\)"),
        (np.full(8, CODEBOOK_SIZE, np.int64), r"\[0, 2048\).*2048"),
        (np.array([0, 1, 2, 3, 4, 5, 6, -1]), r"\[0, 2048\).*-1"),
        (np.zeros(8, np.float32), "integers"),
    ],
)
def test_bad_codes_are_rejected(mimi, codes, match):
    with pytest.raises(MimiInputError, match=match):
        mimi.decode_frame(codes)


def test_state_survives_rejected_input(mimi):
    """A rejected call does not disturb the stream."""
    x = speechy(2, seed=2)
    mimi.reset()
    expected = [mimi.encode_frame(x[:FRAME_SIZE]), mimi.encode_frame(x[FRAME_SIZE:])]
    mimi.reset()
    got = [mimi.encode_frame(x[:FRAME_SIZE])]
    with pytest.raises(ValueError):
        mimi.encode_frame(np.zeros(5, np.float32))
    got.append(mimi.encode_frame(x[FRAME_SIZE:]))
    np.testing.assert_array_equal(np.array(got), np.array(expected))
    mimi.reset()


def test_round_trip_and_offline_helpers(mimi):
    n = 6
    x = speechy(n, seed=3)
    codes = mimi.encode(x[: n * FRAME_SIZE - 100])  # last frame partial -> padded
    assert codes.shape == (8, n) and codes.dtype == np.uint32
    np.testing.assert_array_equal(mimi.encode(x[: n * FRAME_SIZE - 100]), codes)  # fresh state each call
    audio = mimi.decode(codes)
    assert audio.shape == (n * FRAME_SIZE,) and audio.dtype == np.float32 and np.isfinite(audio).all()
    assert np.abs(audio).max() > 0
    # streaming from a fresh state gives the same result as the offline helpers
    mimi.reset()
    padded = np.concatenate([x[: n * FRAME_SIZE - 100], np.zeros(100, np.float32)])
    stream = np.stack([mimi.encode_frame(padded[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]) for i in range(n)], 1)
    np.testing.assert_array_equal(stream, codes)
    out = np.concatenate([mimi.decode_frame(stream[:, i]) for i in range(n)])
    # streaming and offline decoding differ only by float rounding: a millionth of full scale here
    np.testing.assert_allclose(out, audio, rtol=0, atol=1e-4 * np.abs(audio).max())
    mimi.reset()
    assert mimi.encode(np.zeros(0, np.float32)).shape == (8, 0)
    with pytest.raises(MimiInputError, match=r"\(8, frames\)"):
        mimi.decode(np.zeros((7, 3), np.uint32))


def test_fewer_codebooks(mimi_path):
    m = Mimi(mimi_path, num_codebooks=4)
    codes = m.encode_frame(speechy(1))
    assert codes.shape == (4,)
    assert m.decode_frame(codes).shape == (FRAME_SIZE,)
    with pytest.raises(MimiInputError):
        m.decode_frame(np.zeros(8, np.uint32))


def test_bad_arguments(mimi_path):
    with pytest.raises(ValueError, match="num_codebooks"):
        Mimi(mimi_path, num_codebooks=0)
    with pytest.raises(ValueError, match="overlap_frames"):
        Mimi(mimi_path, max_frames=10, overlap_frames=6)
    with pytest.raises(ValueError, match="dtype"):
        Mimi(mimi_path, dtype="f64")


def test_concurrent_encoder_and_decoder_threads(mimi):
    """The two directions are independent and may run on two threads at once."""
    mimi.reset()
    x = speechy(3, seed=4)
    codes = np.random.default_rng(0).integers(0, CODEBOOK_SIZE, (3, 8))
    errors, outs = [], []

    def enc():
        try:
            for i in range(3):
                mimi.encode_frame(x[i * FRAME_SIZE : (i + 1) * FRAME_SIZE])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=enc)
    th.start()
    for c in codes:
        outs.append(mimi.decode_frame(c))
    th.join()
    assert not errors and len(outs) == 3
    mimi.reset()


# --------------------------------------------------------------------------------------------------
# Loading errors
# --------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(MimiError, match="not found") as info:
        Mimi(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing-tensor"])
def test_corrupt_file(tmp_path, mimi_path, kind):
    from safetensors.numpy import save_file

    path = tmp_path / f"{kind}.safetensors"
    if kind == "garbage":
        path.write_bytes(b"this is not a safetensors file" * 10)
    elif kind == "truncated":
        with open(mimi_path, "rb") as f:
            path.write_bytes(f.read(1_000_000))
    else:
        save_file({"encoder.model.0.conv.conv.weight": np.zeros((64, 1, 7), np.float32)}, str(path))
    with pytest.raises(MimiError) as info:
        Mimi(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and "backtrace" not in msg.lower()


# --------------------------------------------------------------------------------------------------
# Long sessions: handoff between rustymimi instances
# --------------------------------------------------------------------------------------------------


def test_bare_rustymimi_hits_its_limit_but_mimi_does_not(mimi_path):
    max_frames = 10
    bare = rustymimi.Tokenizer(str(mimi_path), max_seq_len=2 * max_frames)
    frame = np.zeros((1, 1, FRAME_SIZE), np.float32)
    with pytest.raises(ValueError):
        for _ in range(max_frames + 1):
            bare.encode_step(frame)
    del bare
    m = Mimi(mimi_path, max_frames=max_frames, overlap_frames=3)
    x = speechy(3 * max_frames, seed=5)
    for i in range(3 * max_frames):
        assert m.encode_frame(x[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]).shape == (8,)
    assert m.encoder_handoffs >= 3 and m.decoder_handoffs == 0
    assert m.frames_encoded == 3 * max_frames


def test_reset_close_to_the_limit(mimi_path):
    m = Mimi(mimi_path, max_frames=8, overlap_frames=4)
    x = speechy(12, seed=6)
    fresh = m.encode(x[: 6 * FRAME_SIZE])  # 6 frames: passes the spare threshold, then resets
    again = m.encode(x[: 6 * FRAME_SIZE])
    np.testing.assert_array_equal(again, fresh)
    codes = m.encode(x)  # 12 frames > max_frames: hands off inside the clip
    assert codes.shape == (8, 12)
    np.testing.assert_array_equal(codes[:, :6], fresh)


def test_forced_handoffs_stay_continuous(mimi_path):
    """Handoffs every 16 frames: frames keep coming past the limit, codes match an instance that
    never hands off, and the decoded audio has no jump at the switches."""
    n, max_frames, overlap = 60, 24, 8
    x = speechy(n, seed=7)
    m = Mimi(mimi_path, max_frames=max_frames, overlap_frames=overlap)
    ref = Mimi(mimi_path, max_frames=4 * n)
    codes, audio = [], []
    for i in range(n):
        c = m.encode_frame(x[i * FRAME_SIZE : (i + 1) * FRAME_SIZE])
        codes.append(c)
        audio.append(m.decode_frame(c))
    codes = np.stack(codes, 1)
    audio = np.concatenate(audio)
    assert m.encoder_handoffs == 3 and m.decoder_handoffs == 3, (m.encoder_handoffs, m.decoder_handoffs)
    assert np.isfinite(audio).all()

    ref_codes = ref.encode(x)
    ref_audio = ref.decode(codes)
    agreement = (codes == ref_codes).mean()
    assert agreement >= 0.95, agreement

    # Decoded audio: close to the uninterrupted decoder in every frame ...
    frames_rel = [rel_rms(a, b) for a, b in zip(audio.reshape(n, -1), ref_audio.reshape(n, -1))]
    assert max(frames_rel) < 0.05, max(frames_rel)
    # ... and no jump: the deviation from the reference changes by far less, sample to sample, than
    # the signal itself does (a click would show up as a step in the deviation).
    step_dev = np.abs(np.diff(audio - ref_audio)).max()
    step_ref = np.abs(np.diff(ref_audio)).max()
    assert step_dev < 0.02 * step_ref, (step_dev, step_ref)
    assert np.abs(np.diff(audio)).max() <= 1.02 * step_ref


# --------------------------------------------------------------------------------------------------
# Bounded memory: three instances shared by both directions, created once, alternated with reset
# --------------------------------------------------------------------------------------------------




def test_handoffs_reuse_the_three_instances(mimi_path):
    """Many handoffs in both directions, no rustymimi instance created after construction: the two
    directions share three instances, and each instance serves both directions in turn."""
    m = Mimi(mimi_path, max_frames=8, overlap_frames=3)
    assert m.loads == 3 and m.live_instances == 3
    served: dict[int, set[str]] = {}
    x = speechy(40, seed=8)
    for i in range(40):
        m.decode_frame(m.encode_frame(x[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]))
        for lane in (m._enc, m._dec):
            served.setdefault(id(lane.active), set()).add(lane.name)
    assert m.encoder_handoffs >= 6 and m.decoder_handoffs >= 6
    assert m.loads == 3 and m.live_instances == 3
    assert len(served) == 3 and all(s == {"encoder", "decoder"} for s in served.values()), served


def test_colliding_handoffs_wait_for_the_spare_and_stay_exact(mimi_path):
    """Unstaggered turns make both directions want the one spare at once: the later one keeps its
    instance a little longer (no load), and its codes still match an instance that never hands off."""
    n = 48
    x = speechy(n, seed=11)
    m = Mimi(mimi_path, max_frames=16, overlap_frames=6, stagger=False)
    ref = Mimi(mimi_path, max_frames=4 * n)
    codes = []
    for i in range(n):
        c = m.encode_frame(x[i * FRAME_SIZE : (i + 1) * FRAME_SIZE])
        codes.append(c)
        m.decode_frame(c)
    assert m.postponed_frames > 0 and m.loads == 3
    assert m.encoder_handoffs >= 3 and m.decoder_handoffs >= 2
    assert (np.stack(codes, 1) == ref.encode(x)).mean() >= 0.95


def test_instances_past_their_lifetime_are_replaced(mimi_path):
    """rustymimi never rewinds its position counters; instances at the end of their life are replaced
    (mid-conversation only when a conversation outlives them, otherwise at reset)."""
    m = Mimi(mimi_path, max_frames=6, overlap_frames=2, lifetime_frames=12, stagger=False)

    def used() -> list[int]:
        lanes = [m._enc.active, m._dec.active]
        return [u for inst in m._pool.free + lanes for u in inst.used.values()]

    x = speechy(40, seed=9)
    codes = [m.encode_frame(x[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]) for i in range(40)]
    assert len(codes) == 40 and m.loads > 3  # past 3 x 12 encoder frames a fresh instance was needed
    assert max(used()) <= 12 and m.live_instances == 3
    i = 0
    while max(used()) <= 6:  # run until an instance is past half its life
        m.encode_frame(x[i * FRAME_SIZE : (i + 1) * FRAME_SIZE])
        i += 1
    worn = sum(max(inst.used.values()) > 6 for inst in m._pool.free + [m._enc.active, m._dec.active])
    before = m.loads
    m.reset()  # instances past half their life are replaced here, between conversations
    assert m.loads == before + worn and m.live_instances == 3
    assert max(used()) <= 6  # each has at least half a lifetime left
    assert m.encode_frame(x[:FRAME_SIZE]).shape == (8,)


@pytest.mark.parametrize("instances", [2, 2.5, True])
def test_too_few_instances_are_refused(mimi_path, instances):
    with pytest.raises(ValueError, match="instances"):
        Mimi(mimi_path, instances=instances)




@pytest.mark.skipif(
    not __import__("sys").platform.startswith("linux"),
    reason="Linux only: the bound relies on glibc handing large freed buffers back to the OS (see mimi.py)",
)
def test_memory_stays_flat_over_many_turns(mimi_path):
    """A bare rustymimi instance grows ~64 KiB per frame (keys/values of every position); a Mimi direction
    holds at most one turn's worth. Measured in a fresh process: memory freed earlier in this one would
    hide the bare instance's growth."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    code = f"import json; from tests.helpers.mimi_signals import growth_over_turns; print(json.dumps(growth_over_turns({str(mimi_path)!r})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["handoffs"] >= 8
    assert r["bare"] > 12, r  # the leak this guards against is real here
    assert r["mimi"] < r["bare"] / 3, r
