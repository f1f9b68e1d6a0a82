import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.audio.frames import FRAME_SIZE
from moshi_mlx.engine import ConversationEngine, EngineRunner
from moshi_mlx.settings import GREEDY, EngineSettings, SamplingParams


@pytest.fixture()
def engine(demo_assets_loaded):
    eng = demo_assets_loaded.engine(EngineSettings(seed=1))
    yield eng
    eng.close()


def speechlike(n_frames, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames * FRAME_SIZE) / 24000
    sig = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(t.size)
    return sig.astype(np.float32).reshape(n_frames, FRAME_SIZE)


def test_process_gives_one_frame_per_frame(engine):
    results = [engine.process(f) for f in speechlike(6)]
    assert [r.frame for r in results] == list(range(6))
    assert np.all(results[0].pcm == 0)  # the codebook delay is still filling
    assert results[0].text_token is None
    for r in results[1:]:
        assert r.pcm.shape == (FRAME_SIZE,) and r.pcm.dtype == np.float32
        assert np.isfinite(r.pcm).all() and np.abs(r.pcm).max() > 0
        assert r.text_token is not None
        assert set(r.timings_ms) == {"encode", "lm", "decode"}


def test_text_pieces_come_from_the_tokenizer(engine):
    results = [engine.process(f) for f in speechlike(8, seed=2)]
    pieces = [r.text for r in results if r.text]
    assert pieces, "the random model should say some (made-up) words"
    tok = engine.tokenizer
    for r in results:
        if r.text_token is not None:
            assert r.text == tok.piece(r.text_token)


def test_warmup_then_reset_replays_identically(demo_assets_loaded):
    eng = demo_assets_loaded.engine(EngineSettings(GREEDY, GREEDY, seed=0))
    seconds = eng.warmup()
    assert seconds > 0 and eng.frames_in == 0
    frames = speechlike(5, seed=3)
    a = [eng.process(f) for f in frames]
    eng.reset()
    b = [eng.process(f) for f in frames]
    assert [r.text_token for r in a] == [r.text_token for r in b]
    np.testing.assert_allclose(a[-1].pcm, b[-1].pcm, atol=1e-5)


def test_reset_applies_new_settings(engine):
    engine.reset(EngineSettings(SamplingParams(0.0, 0), SamplingParams(0.0, 0), seed=5))
    assert engine.gen.text_sampling.temperature == 0.0 and engine.gen.seed == 5


def test_wrong_frame_size(engine):
    with pytest.raises(ValueError, match="1920"):
        engine.process(np.zeros(1000, np.float32))


def test_runner_streams_and_drops_oldest_when_behind(engine):
    results = []
    runner = EngineRunner(engine, results.append, max_pending=2).start()
    try:
        # Push 20 frames at once: far faster than the model, so all but a few must be dropped.
        for f in speechlike(20):
            runner.push(f)
        deadline = time.monotonic() + 60
        while runner.stats.frames_out + runner.stats.dropped < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()
    stats = runner.stats
    assert stats.frames_in == 20
    assert stats.frames_out + stats.dropped == 20, stats
    assert stats.dropped >= 14  # at most 2 waiting + 1 per pipeline stage + the one in hand get through
    assert len(results) == stats.frames_out and [r.frame for r in results] == list(range(len(results)))
    assert not any(t.is_alive() for t in threading.enumerate() if t.name in ("moshi-encode", "moshi-decode"))
    assert not runner.alive
    model_thread = engine.mlx._thread
    engine.close()  # the engine's model thread ends too
    assert model_thread is not None and not model_thread.is_alive()


def test_model_work_runs_on_one_thread_whoever_calls(demo_assets_loaded):
    """MLX streams are bound to threads: steps from any caller run on the engine's own thread."""
    eng = demo_assets_loaded.engine(EngineSettings(seed=4))
    seen = set()
    original = eng.gen.step

    def spy(codes):
        seen.add(threading.current_thread().name)
        return original(codes)

    eng.gen.step = spy
    frames = speechlike(2)
    eng.process(frames[0])
    worker = threading.Thread(target=eng.process, args=(frames[1],))
    worker.start()
    worker.join(30)
    eng.close()
    assert seen == {"moshi-mlx"}


def test_runner_reports_worker_errors(demo_assets_loaded):
    class BrokenCodec:
        def encode_frame(self, pcm):
            raise RuntimeError("codec exploded")

        def decode_frame(self, codes):
            return np.zeros(FRAME_SIZE, np.float32)

        def reset(self):
            pass

    # A fake codec stands in for Mimi here: the point is how the runner surfaces a failing stage.
    eng = ConversationEngine(demo_assets_loaded.lm, BrokenCodec(), None)
    errors = []
    runner = EngineRunner(eng, lambda r: None, on_error=errors.append).start()
    runner.push(np.zeros(FRAME_SIZE, np.float32))
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    runner.stop()
    assert errors and "codec exploded" in str(errors[0])
    assert runner.error is errors[0] and not runner.alive


def test_the_model_thread_ends_cleanly_on_an_mlx_without_clear_streams(monkeypatch):
    """mx.clear_streams came with MLX 0.31.2 (macOS 13 stops at 0.29.3): the thread's exit must not need it."""

    from moshi_mlx.mlx_thread import MlxThread

    monkeypatch.delattr(mx, "clear_streams", raising=False)
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    worker = MlxThread()
    assert worker.run(lambda: int(mx.array(2) + 3)) == 5
    worker.close()
    assert failures == []
