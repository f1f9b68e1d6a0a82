"""--transcribe-user's pieces without devices: the worker-thread transcriber, the recorder's two speakers, the memory
plan counting the STT model, the 0x08 message and its query parameter.

The encoder here is a stand-in for Mimi (a fixed function of the frame's samples -> 32 codes): the real codecs are
slow to open (rustymimi: 1.5 GB, seconds) and are exercised with the STT model in tests/e2e/test_transcribe_user.py;
what is tested here is the threading and timing around the real tiny STT model and the real WordTimer.
"""

from __future__ import annotations

import json
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.audio.frames import FRAME_SIZE
from moshi_mlx.audio.recording import MOSHI, USER, ConversationRecorder
from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.budget import GB, plan_memory
from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.models.config import config_tiny_stt
from moshi_mlx.net import protocol
from moshi_mlx.settings import GREEDY
from moshi_mlx.transcribe import Transcriber, Word
from moshi_mlx.user_transcript import MAX_BEHIND_S, UserTranscriber


class CodesOf:
    """Stands in for Mimi: 32 codes in [0, 2048) from the frame's samples (deterministic); `gate` can hold it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()

    def encode_frame(self, pcm: np.ndarray) -> np.ndarray:
        self.gate.wait()
        q = np.abs(np.asarray(pcm).reshape(32, -1)).mean(axis=1)
        return (q * 1e4).astype(np.int64) % 2048


class Pieces:
    """Every id a piece of its own: ids divisible by 3 start a word."""

    def piece(self, token: int) -> str | None:
        return None if token == 3 else (" w" if token % 3 == 0 else "x") + str(token)


@pytest.fixture(scope="module")
def stt_lm():
    mx.random.seed(5)
    model = build_model(config_tiny_stt(), None, mx.float32)
    mx.eval(model.parameters())
    return model


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.6, 0.6, FRAME_SIZE).astype(np.float32) for _ in range(n)]


def test_the_worker_gives_the_words_a_direct_transcriber_gives(stt_lm):
    audio = frames(30)
    direct = Transcriber(LmGen(stt_lm, GREEDY, GREEDY), CodesOf(), Pieces())
    expected = [w for f in audio for w in direct.feed(f)] + direct.finish()
    got: list[Word] = []
    callers: set[str] = set()

    def on_words(words: list[Word]) -> None:
        callers.add(threading.current_thread().name)
        got.extend(words)

    user = UserTranscriber(stt_lm, CodesOf(), Pieces(), on_words)
    for f in audio:
        user.push(f)
        while user.waiting > 3:  # keep within MAX_BEHIND_S on a slow machine: nothing dropped here
            time.sleep(0.01)
    user.close(flush=True)
    assert expected, "the random model writes words"
    assert got == expected and user.dropped == 0 and user.error is None
    assert callers == {"stt-user"}  # the words come from its own worker thread


def test_push_never_waits_and_drops_past_the_bound(stt_lm):
    encoder = CodesOf()
    encoder.gate.clear()  # the model is stuck: frames pile up
    user = UserTranscriber(stt_lm, encoder, Pieces(), lambda words: None)
    bound = round(MAX_BEHIND_S * 12.5)
    t0 = time.perf_counter()
    for f in frames(bound + 10):
        user.push(f)
    pushing = time.perf_counter() - t0
    assert pushing < 0.5, pushing
    assert user.frames_in == bound + 10 and user.dropped == 10  # `bound` wait (one in the encoder), 10 dropped
    assert user.waiting == bound
    encoder.gate.set()
    user.close(flush=False)
    user.push(frames(1)[0])  # after close: ignored
    assert user.frames_in == bound + 10


def test_a_non_stt_model_is_refused(stt_lm):
    from moshi_mlx.models.config import config_tiny
    from moshi_mlx.transcribe import TranscribeError

    with pytest.raises(TranscribeError, match="text-only"):
        UserTranscriber(build_model(config_tiny(), None, mx.float32), CodesOf(), Pieces(), lambda w: None)


# -- the recording: both speakers ------------------------------------------------------------------
def test_recording_holds_both_speakers_in_time_order(tmp_path):
    clock = iter([10.0] + [10.0 + i for i in range(1, 10)])
    rec = ConversationRecorder(tmp_path, clock=lambda: next(clock))
    rec.add_user(np.zeros(FRAME_SIZE * 50, np.float32))
    rec.add_text(" Hi", t=0.5)
    rec.add_text(" there.", t=0.9)
    rec.add_text(" hello", t=0.2, speaker=USER, end=0.4)  # the STT's words come late, and in batches
    rec.add_text(" you", t=1.0, speaker=USER, end=1.2)
    rec.add_text(" moshi", t=0.45, speaker=USER, end=0.6)
    files = rec.finish()
    meta = json.loads(files.json.read_text())
    assert [(p["speaker"], p["text"]) for p in meta["pieces"]] == [
        (USER, " hello"), (USER, " moshi"), (MOSHI, " Hi"), (MOSHI, " there."), (USER, " you")]
    assert meta["text"] == "Hi there." and meta["user_text"] == "hello moshi you"
    assert [p.get("end") for p in meta["pieces"]] == [0.4, 0.6, None, None, 1.2]
    assert files.text.read_text() == "[0.2 s] you: hello moshi\n[0.5 s] moshi: Hi there.\n[1.0 s] you: you\n"


def test_older_partial_transcript_lines_read_as_moshis(tmp_path):
    """A crash's partial transcript from before the speaker field: its pieces are Moshi's."""
    from moshi_mlx.audio.recording import _read_pieces

    part = tmp_path / "moshi-x-transcript.partial.jsonl"
    part.write_text(json.dumps({"t": 0.1, "text": " old"}) + "\n"
                    + json.dumps({"t": 0.3, "text": " new", "speaker": USER, "end": 0.5}) + "\n")
    assert _read_pieces(part) == [{"t": 0.1, "text": " old", "speaker": MOSHI},
                                  {"t": 0.3, "text": " new", "speaker": USER, "end": 0.5}]


# -- the memory plan -------------------------------------------------------------------------------
def test_the_memory_plan_takes_the_stt_model_out_of_the_budget():
    args = {"weight_bytes": int(4 * GB), "num_layers": 32, "num_heads": 32, "head_dim": 128, "context": 3000,
            "budget_bytes": int(5.2 * GB)}
    alone = plan_memory(**args)
    both = plan_memory(**args, stt_bytes=int(0.6 * GB), stt_note="STT for your words 0.60 GB")
    assert both.total_bytes <= both.budget_bytes and alone.total_bytes <= alone.budget_bytes
    assert both.context < alone.context or both.kv_bits < alone.kv_bits  # less room left for Moshi's window
    assert "+ STT for your words 0.60 GB" in both.describe() and "STT" not in alone.describe()


# -- the WebSocket -----------------------------------------------------------------------------------
def test_user_words_message_and_its_query_parameter():
    message = protocol.decode(protocol.encode_user_words([Word("hello", 0.24, 0.5), Word("you", 0.5, 0.81234)]))
    assert message.kind == protocol.Kind.USER_WORDS
    assert json.loads(message.payload) == {"words": [{"text": "hello", "start": 0.24, "end": 0.5},
                                                     {"text": "you", "start": 0.5, "end": 0.812}]}
    assert protocol.parse_query({"user_words": "1"}).user_words
    assert not protocol.parse_query({}).user_words and protocol.parse_query({"user_words": "1"}).unknown == ()
    with pytest.raises(protocol.ParamError, match="user_words must be 0 or 1"):
        protocol.parse_query({"user_words": "yes"})


# -- the benchmark's STT layouts and flags -------------------------------------------------------------
def test_stt_sizes_have_the_published_layouts():
    from moshi_mlx.benchmark.stt import stt_config

    one, big = stt_config("1b"), stt_config("2.6b")
    assert (one.transformer.num_layers, one.transformer.d_model, one.transformer.context) == (16, 2048, 750)
    assert (big.transformer.num_layers, big.transformer.num_heads, big.transformer.context) == (48, 32, 375)
    assert one.text_only and big.text_only and one.audio_codebooks == big.audio_codebooks == 32
    assert big.text_out_vocab_size == 4000 and big.stt.audio_delay_seconds == 2.5


def test_benchmark_stt_flags_are_checked_before_loading():
    from moshi_mlx.benchmark.args import build_parser, check_args

    parser = build_parser()
    args = check_args(parser, parser.parse_args(["--stt-only", "--stt-size", "tiny,1b"]))
    assert args.stt_sizes == ["tiny", "1b"]
    for bad in (["--stt-only", "--stt-size", "3b"], ["--stt-only", "--demo"], ["--demo", "--transcribe-user", "--lm-only"]):
        with pytest.raises(SystemExit):
            check_args(parser, parser.parse_args(bad))


def test_a_failing_model_is_told_once_and_later_frames_are_ignored(stt_lm):
    class Broken(CodesOf):
        def encode_frame(self, pcm):
            raise RuntimeError("codec broke")

    told: list[BaseException] = []
    user = UserTranscriber(stt_lm, Broken(), Pieces(), lambda words: None, on_error=told.append)
    user.push(frames(1)[0])
    while user.waiting:
        time.sleep(0.01)
    user.close(flush=False)
    assert [str(e) for e in told] == ["codec broke"] and str(user.error) == "codec broke"
    user.push(frames(1)[0])
    assert user.frames_in == 1
