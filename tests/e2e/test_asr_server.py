"""Kyutai's STT WebSocket through the real entry point: `python -m moshi_mlx.local_web --hf-repo kyutai/stt-1b-en_fr-mlx`
on a stand-in repo in an offline hub cache (the tiny random STT model in Kyutai's layout, the random rustymimi Mimi,
the stand-in 8000-piece tokenizer), spoken English from espeak-ng sent at real time by the client written from
Kyutai's scripts (tests/helpers/asr_client.py). A random model's words are made-up words: what is checked is the
protocol (order, times, probabilities, markers, busy) and the latency, not the text.
"""

from __future__ import annotations

import asyncio
import statistics

import aiohttp
import numpy as np
import pytest

from moshi_mlx.audio.frames import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.model_files.stand_ins import cache_stand_in_repo, write_stand_in_repo
from moshi_mlx.models.config import config_tiny_stt
from moshi_mlx.net import asr_protocol as asr
from moshi_mlx.net import protocol
from tests.helpers.asr_client import stream
from tests.helpers.audio_env import base_env
from tests.helpers.web_process import LocalWeb
from tests.helpers.web_server import make_speech

REPO = "kyutai/stt-1b-en_fr-mlx"


@pytest.fixture(scope="module")
def server(demo_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("stt-repo")
    config = {**config_tiny_stt().to_kyutai_dict(), "moshi_name": "model.safetensors",
              "mimi_name": "mimi-pytorch-e351c8d8@125.safetensors", "tokenizer_name": "tokenizer_en_fr_audio_8000.model"}
    folder = write_stand_in_repo(root / "repo", config, seed=2, mimi_source=demo_files.mimi_path)
    cache_stand_in_repo(root / "hf_home" / "hub", REPO, folder)
    env = {k: v for k, v in base_env().items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1")
    with LocalWeb(root / "local_web.log", ["--hf-repo", REPO], env=env, demo=False) as web:
        yield web


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    return make_speech(tmp_path_factory.mktemp("speech"), SAMPLE_RATE)


def test_speech_at_real_time_gives_timed_words_steps_and_the_marker(server, speech):
    url = server.http.replace("http", "ws", 1) + asr.ASR_PATH
    assert asr.ASR_PATH in server.log  # local_web says where it answers
    run = asyncio.run(stream(url, speech, rtf=1.0, tail_silence_s=3.0))
    kinds = [m["type"] for _, m in run.received]
    assert kinds[0] == "Ready" and kinds[-1] == "Marker"
    steps = run.of("Step")
    assert [m["step_idx"] for m in steps] == list(range(1, len(steps) + 1))
    assert len(steps) >= len(speech) // FRAME_SIZE
    assert all(len(m["prs"]) == 4 and all(0.0 <= p <= 1.0 for p in m["prs"]) for m in steps)
    words = run.words()
    assert words, kinds
    heard = len(steps) * FRAME_SIZE / SAMPLE_RATE
    starts = [w[1] for w in words]
    assert starts == sorted(starts) and all(0.0 <= s <= heard for s in starts)
    assert all(stop is None or start <= stop <= heard for _, start, stop in words)
    # Latency (printed for the record): a Word leaves once its text is complete, at least the model's delay
    # (0.5 s) after its start; an EndWord once the boundary after it has come through the delay; plus however far
    # behind the server runs. (A random model writes from its first step: words of the first 0.5 s are dated 0.)
    word_lag = [when - run.sent_at(m["start_time"]) for when, m in run.received
                if m["type"] == "Word" and m["start_time"] > 0]
    end_lag = [when - run.sent_at(m["stop_time"]) for when, m in run.received if m["type"] == "EndWord"]
    # how far behind the server runs: the Step of frame k after the chunk ending frame k left
    step_lag = [when - run.sent_at((m["step_idx"] * FRAME_SIZE - 1) / SAMPLE_RATE) for when, m in run.received
                if m["type"] == "Step" and m["step_idx"] * FRAME_SIZE <= len(speech)]
    print(f"\nStep after its frame was sent: median {statistics.median(step_lag) * 1e3:.0f} ms, "
          f"max {max(step_lag) * 1e3:.0f} ms")
    print(f"words: {len(word_lag)}; Word after its start was sent: median {statistics.median(word_lag):.3f} s, "
          f"max {max(word_lag):.3f} s; EndWord after its stop was sent: "
          + (f"median {statistics.median(end_lag):.3f} s, max {max(end_lag):.3f} s" if end_lag else "none"))
    # No word is told before the model could know it: its time plus the model's delay has been stepped through.
    steps_seen = 0
    for _, m in run.received:
        steps_seen += m["type"] == "Step"
        if m["type"] in ("Word", "EndWord"):
            t = m.get("start_time", m.get("stop_time"))
            assert t == 0.0 or t + 0.5 <= steps_seen * FRAME_SIZE / SAMPLE_RATE + 1e-6, (m, steps_seen)


async def _busy_while_a_stream_is_open(http: str) -> list[str]:
    seen = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(http.replace("http", "ws", 1) + asr.ASR_PATH,
                                      headers={asr.API_KEY_HEADER: "public_token"}) as ws:
            assert asr.unpack_out((await ws.receive(timeout=10)).data) == asr.ready()
            async with session.get(http + protocol.INFO_PATH) as r:
                seen.append("info busy" if (await r.json())["busy"] else "info idle")
            async with session.ws_connect(http.replace("http", "ws", 1) + protocol.CHAT_PATH) as chat:
                msg = await chat.receive(timeout=10)
                seen.append(protocol.decode(msg.data).kind.name)
            async with session.ws_connect(http.replace("http", "ws", 1) + asr.ASR_PATH) as second:
                seen.append(asr.unpack_out((await second.receive(timeout=10)).data)["message"])
            await ws.send_bytes(b"\x93garbage")
            seen.append(asr.unpack_out((await ws.receive(timeout=10)).data)["type"])
            await ws.send_bytes(asr.pack_audio(np.zeros(FRAME_SIZE, np.float32)))
            seen.append(asr.unpack_out((await ws.receive(timeout=10)).data)["type"])
    return seen


def test_one_client_at_a_time_across_chat_and_asr(server):
    seen = asyncio.run(_busy_while_a_stream_is_open(server.http))
    assert seen[0] == "info busy" and seen[1] == "ERROR"
    assert seen[2].startswith("busy") and seen[3:] == ["Error", "Step"]
    server.wait_idle()  # the stream's leaving frees the model


def test_the_stt_demo_answers_too(tmp_path):
    """`local_web --demo-stt` (the random STT stand-in, no download): the route is there for a newcomer too."""
    with LocalWeb(tmp_path / "demo.log", ["--demo-stt"], demo=False) as web:
        run = asyncio.run(stream(web.http.replace("http", "ws", 1) + asr.ASR_PATH,
                                 np.zeros(SAMPLE_RATE // 2, np.float32), tail_silence_s=0.0))
    kinds = [m["type"] for _, m in run.received]
    assert kinds[0] == "Ready" and kinds[-1] == "Marker" and "Step" in kinds
