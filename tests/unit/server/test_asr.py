"""/api/asr-streaming (moshi_mlx/server/asr.py) over a real aiohttp server and real WebSockets.

The model is the tiny random STT model (`config_tiny_stt`: Kyutai's layout, 4 extra heads, stt-1b's delay) run
by the real LmGen and Transcriber on an MLX thread. Mimi is stood in for by an encoder computing codes from the
samples (the 385 MB codec per test is too much here; tests/e2e/test_asr_server.py runs the real one), and the
tokenizer by a table giving every id a piece, so the random model's tokens read as words. The word/marker
bookkeeping of `AsrStream` is also checked on a scripted token stream (a stand-in for the model, so the exact
order of Word/EndWord/Marker can be written down).
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import mlx.core as mx
import msgpack
import numpy as np
import pytest
from aiohttp import web

from moshi_mlx.audio.frames import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.models.config import config_tiny_stt
from moshi_mlx.net import asr_protocol as asr
from moshi_mlx.server.asr import BUSY, AsrServer, AsrStream, SttModel, add_asr_route
from moshi_mlx.transcribe import WordTimer
from tests.helpers.asr_client import stream

PAD, EOP = 3, 0


class Encoder:
    """Stands in for Mimi: 32 codes from the frame's samples."""

    def encode_frame(self, pcm: np.ndarray) -> np.ndarray:
        return (np.abs(pcm[:32]) * 1e4).astype(np.int32) % 2048

    def reset(self) -> None:
        pass


class AllPieces:
    """Every text id >= 4 is a piece; one in three starts a word."""

    def piece(self, token: int) -> str | None:
        if token < 4:
            return None
        return f" w{token}" if token % 3 == 0 else f"p{token}"


@pytest.fixture(scope="module")
def stt_model() -> SttModel:
    mx.random.seed(3)
    lm = build_model(config_tiny_stt(), None, mx.float32)
    mx.eval(lm.parameters())  # made here; the model's thread has its own stream
    return SttModel(lm, Encoder(), AllPieces())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, server: AsrServer) -> None:
        self.server = server
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> "Served":
        app = web.Application()
        add_asr_route(app, self.server)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = _free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"ws://127.0.0.1:{port}{asr.ASR_PATH}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict:
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    return asr.unpack_out(msg.data)


@pytest.mark.asyncio
async def test_words_steps_and_marker_come_back_in_order(stt_model):
    audio = speechlike(2.0)
    async with Served(AsrServer(stt_model)) as s:
        run = await stream(s.url, audio, tail_silence_s=1.0)
    kinds = [m["type"] for _, m in run.received]
    assert kinds[0] == "Ready" and kinds[-1] == "Marker"
    steps = run.of("Step")
    # one Step per frame fed (the audio, then silence until the marker was due), each with the 4 heads
    assert [m["step_idx"] for m in steps] == list(range(1, len(steps) + 1))
    assert len(steps) >= len(audio) // FRAME_SIZE + 7
    assert all(len(m["prs"]) == 4 and all(0.0 <= p <= 1.0 for p in m["prs"]) for m in steps)
    assert all(0 <= m["buffered_pcm"] < FRAME_SIZE for m in steps)
    words = run.words()
    assert words, kinds
    starts = [w[1] for w in words]
    assert starts == sorted(starts)
    fed = len(steps) / FRAME_RATE
    assert all(0.0 <= start <= fed for _, start, _ in words)
    assert all(stop is None or start <= stop <= fed for _, start, stop in words)
    # every EndWord follows its Word; a Word never comes twice for one word
    pending = 0
    for kind in kinds:
        pending += {"Word": 1, "EndWord": -1}.get(kind, 0)
        assert pending in (0, 1)


class ScriptedTranscriber:
    """Stands in for the model: each frame fed gives the next scripted text token to a real WordTimer."""

    flush_frames = 2

    class Gen:
        step_index = 0

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)
        self.timer = WordTimer(AllPieces(), offset_seconds=0.0)
        self.frames = 0
        self.gen = self.Gen()
        self.pause_probabilities = None

    def feed(self, frame: np.ndarray) -> list:
        self.frames += 1
        self.gen.step_index += 1
        return self.timer.push(self.tokens.pop(0) if self.tokens else PAD)


def test_a_word_is_said_once_its_text_is_complete_and_ended_at_the_next_boundary():
    s = AsrStream(ScriptedTranscriber([PAD, 6, 4, PAD, PAD, EOP, 9, 12, PAD]))  # " w6"+"p4", " w9", " w12"
    frame = np.zeros(FRAME_SIZE, np.float32)
    said = [s.audio(frame) for _ in range(9)]
    step = 1 / FRAME_RATE
    assert said[:3] == [[], [], []]  # "w6p4" may still grow
    assert said[3] == [asr.word("w6p4", 1 * step)]  # a pad: its text is complete
    assert said[5] == [asr.end_word(5 * step)]  # the end of padding closes it
    assert said[7] == [asr.word("w9", 6 * step), asr.end_word(7 * step)]  # closed by the next word
    assert said[8] == [asr.word("w12", 7 * step)]


def test_a_marker_comes_back_after_the_audio_before_it_and_the_delay():
    s = AsrStream(ScriptedTranscriber([]))
    assert s.audio(np.zeros(FRAME_SIZE + 5, np.float32)) == []
    assert s.marker(1) == []  # due after frame 2 (the 5 samples count whole) + 2 frames of delay
    assert s.audio(np.zeros(FRAME_SIZE * 2 - 5, np.float32)) == []
    assert s.audio(np.zeros(FRAME_SIZE, np.float32)) == [asr.marker(1)]
    s.marker(2)
    assert s.pad_to_markers() == [asr.marker(2)] and s.t.frames == 6 and s.buffered == 0


@pytest.mark.asyncio
async def test_bad_messages_get_an_error_and_the_stream_goes_on(stt_model):
    bad = {
        b"\xc1not msgpack": "not a MessagePack message",
        msgpack.packb([1, 2]): "MessagePack map",
        msgpack.packb({"pcm": []}): "string 'type'",
        msgpack.packb({"type": "Flush"}): "unknown message type 'Flush'",
        msgpack.packb({"type": "Audio", "pcm": ["a", "b"]}): "array of numbers",
        msgpack.packb({"type": "Audio", "pcm": 0.5}): "array of numbers",
        msgpack.packb({"type": "Audio", "pcm": [float("nan")]}): "NaN",
        msgpack.packb({"type": "Audio", "pcm": [0.0] * (asr.MAX_PCM_SAMPLES + 1)}, use_single_float=True):
            "over the limit",
        msgpack.packb({"type": "Marker", "id": 1.5}): "'id' must be an integer",
        msgpack.packb({"type": "OggOpus", "data": b"OggS"}): "OggOpus is not supported",
    }
    async with Served(AsrServer(stt_model)) as s:
        async with aiohttp.ClientSession() as session, session.ws_connect(s.url) as ws:
            assert await _receive(ws) == asr.ready()
            for data, why in bad.items():
                await ws.send_bytes(data)
                reply = await _receive(ws)
                assert reply["type"] == "Error" and why in reply["message"], (why, reply)
                assert "\n" not in reply["message"]
            await ws.send_str("hello")
            assert "text message" in (await _receive(ws))["message"]
            await ws.send_bytes(asr.pack_audio(np.zeros(FRAME_SIZE, np.float32)))
            assert (await _receive(ws))["type"] == "Step"  # still served
            await ws.send_bytes(asr.pack_marker(-3))  # then quiet: the server feeds the silence itself
            kinds = []
            while not kinds or kinds[-1] != "Marker":
                msg = await _receive(ws)
                kinds.append(msg["type"])
            assert msg == asr.marker(-3) and kinds.count("Step") == 7  # 0.5 s of delay: 7 frames of silence


@pytest.mark.asyncio
async def test_a_second_client_is_busy_and_a_leaver_frees_the_model(stt_model):
    server = AsrServer(stt_model)
    async with Served(server) as s:
        async with aiohttp.ClientSession() as session:
            first = await session.ws_connect(s.url)
            assert await _receive(first) == asr.ready()
            async with session.ws_connect(s.url) as second:
                assert await _receive(second) == asr.error(BUSY)
                assert (await second.receive()).type == aiohttp.WSMsgType.CLOSE
            await first.send_bytes(asr.pack_audio(np.zeros(3 * FRAME_SIZE, np.float32)))
            await first.close()  # leaves mid-stream
            for _ in range(100):
                if server.active is None:
                    break
                await asyncio.sleep(0.05)
            assert server.active is None
            async with session.ws_connect(s.url) as third:
                assert await _receive(third) == asr.ready()
        assert server.streams == 2 and server.refused_busy == 1




def test_the_route_needs_a_text_only_engine():
    from moshi_mlx.engine import ConversationEngine
    from moshi_mlx.errors import MoshiError
    from moshi_mlx.models.config import config_tiny
    from moshi_mlx.server.asr import EngineStt

    engine = ConversationEngine(build_model(config_tiny(), None, mx.float32), Encoder(), None)  # answers with audio
    try:
        with pytest.raises(MoshiError, match="needs a speech-to-text model"):
            EngineStt(engine)
    finally:
        engine.close()


@pytest.mark.asyncio
async def test_the_engines_own_model_is_reset_for_each_stream():
    """local_web's wiring: the text-only ConversationEngine's model, Mimi and MLX thread behind the route; the
    same audio twice gives the same messages (the engine is reset, nothing leaks from the first stream)."""
    from moshi_mlx.engine import ConversationEngine
    from moshi_mlx.server.asr import EngineStt

    mx.random.seed(5)
    lm = build_model(config_tiny_stt(), None, mx.float32)
    mx.eval(lm.parameters())
    engine = ConversationEngine(lm, Encoder(), AllPieces())
    try:
        async with Served(AsrServer(EngineStt(engine))) as s:
            audio = speechlike(1.5, seed=2)
            runs = [await stream(s.url, audio, tail_silence_s=1.0) for _ in range(2)]
    finally:
        engine.close()
    first, second = ([m for _, m in run.received] for run in runs)
    assert first == second and any(m["type"] == "Word" for m in first)


@pytest.mark.asyncio
async def test_a_client_that_leaves_with_audio_queued_frees_the_model_at_once(stt_model):
    """Kyutai's file script sends 35 s of silence after its marker and closes: that audio is not transcribed for
    nobody. (Also: no heartbeat drops a client that is seconds ahead of the model.)"""
    server = AsrServer(stt_model)
    second = np.zeros(SAMPLE_RATE, np.float32)
    async with Served(server) as s:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(s.url) as ws:
                assert await _receive(ws) == asr.ready()
                for _ in range(40):
                    await ws.send_bytes(asr.pack_audio(second))
            for _ in range(100):
                if server.active is None:
                    break
                await asyncio.sleep(0.05)
    assert server.active is None and server.last_frames < 40 * FRAME_RATE / 2


@pytest.mark.asyncio
async def test_a_quiet_client_is_closed_and_the_model_freed(stt_model):
    server = AsrServer(stt_model, idle_close_s=0.3)
    async with Served(server) as s:
        async with aiohttp.ClientSession() as session, session.ws_connect(s.url) as ws:
            assert await _receive(ws) == asr.ready()
            assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        assert server.active is None
