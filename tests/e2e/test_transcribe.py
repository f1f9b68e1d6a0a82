"""Timed words through the real codec: rustymimi (random weights, 32 codebooks), a tiny random STT model and the
stand-in 8000-piece SentencePiece tokenizer (the tokenizer is trained and Mimi loaded: seconds); then the
`run_inference` command on stand-in STT files, through its real entry point (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.audio.frames import FRAME_SIZE
from moshi_mlx.generate import LmGen
from moshi_mlx.model_files.checkpoint import build_model
from moshi_mlx.models.config import config_tiny_stt
from moshi_mlx.settings import GREEDY
from moshi_mlx.transcribe import transcribe
from tests.helpers.audio_env import ROOT, base_env
from tests.helpers.web_server import write_wav


def test_real_mimi_and_sentencepiece_stand_ins(demo_files, tmp_path):
    """The whole path with the real codec (rustymimi, random weights, 32 codebooks) and the stand-in
    8000-piece SentencePiece tokenizer: words are the tokenizer's made-up words, in time order."""
    from moshi_mlx.audio.mimi import Mimi
    from moshi_mlx.model_files.stand_ins import write_stand_in_tokenizer
    from moshi_mlx.tokenizer import TextTokenizer

    mx.random.seed(4)
    stt_model = build_model(config_tiny_stt(), None, mx.float32)
    rng = np.random.default_rng(1)
    speech = [rng.uniform(0.2, 0.9, FRAME_SIZE).astype(np.float32) for _ in range(25)]
    tokenizer = TextTokenizer(write_stand_in_tokenizer(tmp_path / "tok8000.model", 8000))
    with Mimi(demo_files.mimi_path, num_codebooks=32) as mimi:
        words = list(transcribe(speech, LmGen(stt_model, GREEDY, GREEDY), mimi, tokenizer))
    assert words, "a random model writes some words"
    assert all(w.text and " " not in w.text for w in words)
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(0.0 <= w.start <= w.end <= 2.0 for w in words)


# ------------------------------------------------------------------------------------------------
# `python -m moshi_mlx.run_inference in.wav` with a speech-to-text model (stand-in files, no download)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stt_files(demo_files, tmp_path_factory):
    """A stand-in STT checkpoint (random bf16 weights of `config_tiny_stt`, our config.json with stt_config),
    the stand-in 8000-piece tokenizer and the random Mimi: the flags that replace `--hf-repo kyutai/stt-...`."""
    from moshi_mlx.model_files.stand_ins import write_random_lm, write_stand_in_tokenizer

    root = tmp_path_factory.mktemp("stt-files")
    weights, config = write_random_lm(config_tiny_stt(), None, root, seed=2)
    tokenizer = write_stand_in_tokenizer(root / "tokenizer_8000.model", 8000)
    return ["--moshi-weights", str(weights), "--lm-config", str(config), "--mimi-weights", str(demo_files.mimi_path),
            "--tokenizer", str(tokenizer)]


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    signal = 0.3 * np.sin(np.linspace(0, 2200, 16000 * 3)) * rng.uniform(0.5, 1.0, 16000 * 3)  # 3 s at 16 kHz
    return write_wav(tmp_path_factory.mktemp("in") / "in.wav", signal, 16000)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moshi_mlx.run_inference", *args], env=base_env(), cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=120)


def test_cli_prints_timed_words(stt_files, wav):
    r = _run([str(wav), *stt_files])
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert lines and all(len(x) == 3 for x in lines)
    starts, ends = [float(x[0]) for x in lines], [float(x[1]) for x in lines]
    assert starts == sorted(starts) and all(0 <= s <= e <= 3.0 for s, e in zip(starts, ends, strict=True))
    assert "words" in r.stderr and list(wav.parent.iterdir()) == [wav]  # no audio written beside the input


@pytest.mark.parametrize("suffix", [".json", ".srt", ".txt"])
def test_cli_writes_the_transcript_by_suffix(stt_files, wav, tmp_path, suffix):
    out = tmp_path / f"t{suffix}"
    r = _run([str(wav), *stt_files, "--transcript", str(out)])
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    text = out.read_text(encoding="utf-8")
    if suffix == ".json":
        data = json.loads(text)
        assert data["stt_config"] == {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}
        assert data["duration"] == pytest.approx(3.0) and data["words"]
        ends = data["end_of_turn_detected_at"]  # the stand-in has Kyutai's four VAD heads (random weights)
        assert isinstance(ends, list) and all(0.0 <= t <= 3.0 for t in ends) and ends == sorted(ends)
        assert data["text"] == " ".join(w["text"] for w in data["words"])
    elif suffix == ".srt":
        assert text.startswith("1\n00:00:0") and " --> " in text
    else:
        assert all(len(line.split()) == 3 for line in text.splitlines()) and text


def test_cli_refuses_in_one_line(stt_files, wav, tmp_path):
    r = _run([str(wav), *stt_files, "--transcript", str(tmp_path / "t.doc")])
    assert r.returncode == 1 and "one of .json, .txt, .srt" in r.stderr and "loaded" not in r.stderr
    r = _run([str(wav), str(tmp_path / "out.wav"), *stt_files])
    assert r.returncode == 1 and "writes no audio: drop OUTPUT" in r.stderr
    assert not (tmp_path / "out.wav").exists()


def test_cli_moshi_still_needs_an_output(wav):
    r = _run([str(wav), "--demo"])
    assert r.returncode == 1 and "OUTPUT is needed" in r.stderr and r.stdout == ""


def test_cli_loads_a_pytorch_layout_stt_checkpoint(stt_files, wav, tmp_path):
    """A random checkpoint in Kyutai's PyTorch names with Kyutai's config.json keys (what a `-candle` repo
    holds; Mimi's 2048 codes, 8000 text pieces), loaded in memory through the converter's name plan: no
    conversion step, the same timed-word output. A model whose audio card is not Mimi's is refused in one line
    (the parity fixture's scaled-down card of 32)."""
    from tests.helpers.family import pytorch_checkpoint, variant_config
    from tests.helpers.kyutai import FIXTURES

    cfg = {**variant_config("stt_text_only"), "card": 2048, "text_card": 8000, "num_heads": 2}  # head dim 32: 8-bit KV
    weights = pytorch_checkpoint(cfg, np.random.default_rng(3))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in weights.items()})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mimi_and_tokenizer = stt_files[4:]
    r = _run([str(wav), "--moshi-weights", str(tmp_path / "model.safetensors"), "--lm-config",
              str(tmp_path / "config.json"), *mimi_and_tokenizer])
    assert r.returncode == 0, r.stderr
    assert r.stdout and all(len(line.split()) == 3 for line in r.stdout.splitlines())
    r = _run([str(wav), "--moshi-weights", str(FIXTURES / "stt" / "model.safetensors"),
              "--lm-config", str(FIXTURES / "stt" / "config.json"), *mimi_and_tokenizer])
    assert r.returncode == 1 and "audio card 32" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# `--hf-repo kyutai/stt-1b-en_fr-candle -q 4/8`: a PyTorch-layout repo, quantized at load (offline stand-in)
# ------------------------------------------------------------------------------------------------

CANDLE_REPO = "kyutai/stt-1b-en_fr-candle"


@pytest.fixture(scope="module")
def candle_home(demo_files, tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds a stand-in of the `-candle` STT repo, as a download leaves it: config.json
    with Kyutai's keys naming every file, random bf16 weights in Kyutai's PyTorch names (widths q4 and q8 can
    quantize: dim 256, gated hidden 704), the random Mimi and the stand-in 8000-piece tokenizer."""
    from moshi_mlx.model_files.stand_ins import cache_stand_in_repo, write_stand_in_tokenizer
    from tests.helpers.family import pytorch_checkpoint, variant_config

    root = tmp_path_factory.mktemp("candle")
    folder = root / "repo"
    folder.mkdir()
    cfg = {**variant_config("stt_text_only"), "dim": 256, "num_heads": 4, "card": 2048, "text_card": 8000,
           "moshi_name": "model.safetensors", "mimi_name": "mimi-pytorch-e351c8d8@125.safetensors",
           "tokenizer_name": "tokenizer_en_fr_audio_8000.model"}
    weights = pytorch_checkpoint(cfg, np.random.default_rng(5))
    mx.save_safetensors(str(folder / cfg["moshi_name"]),
                        {k: mx.array(v.astype(np.float32)).astype(mx.bfloat16) for k, v in weights.items()})
    del weights
    (folder / cfg["mimi_name"]).symlink_to(demo_files.mimi_path)
    write_stand_in_tokenizer(folder / cfg["tokenizer_name"], 8000)
    (folder / "config.json").write_text(json.dumps(cfg))
    home = root / "hf_home"
    cache_stand_in_repo(home / "hub", CANDLE_REPO, folder)
    return home


@pytest.mark.parametrize("bits", [4, 8])
def test_cli_quantizes_a_candle_repo_at_load(candle_home, wav, bits):
    """-q on a `-candle` repo is not refused for lack of a q4/q8 file: its PyTorch-layout weights are mapped and
    quantized while loading, and the timed words come out as from any STT model."""
    env = {k: v for k, v in base_env().items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(candle_home), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "moshi_mlx.run_inference", str(wav), "--hf-repo", CANDLE_REPO,
                        "-q", str(bits)], env=env, cwd=ROOT, check=False, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"quantizing them to {bits} bits" in r.stderr and "model.safetensors" in r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert lines and all(len(x) == 3 for x in lines)


def test_cli_prints_each_word_as_it_comes(stt_files, tmp_path):
    """Word lines reach a pipe while the file is still being transcribed (flushed per word), not all at the end:
    the first line is read while the process runs, and the lines arrive spread over the run (held back in a
    buffer they would all come in one write, within a millisecond)."""
    rng = np.random.default_rng(7)
    seconds = 12
    signal = 0.3 * np.sin(np.linspace(0, 9000, 16000 * seconds)) * rng.uniform(0.5, 1.0, 16000 * seconds)
    long_wav = write_wav(tmp_path / "long.wav", signal, 16000)
    env = {k: v for k, v in base_env().items() if k != "PYTHONUNBUFFERED"}  # as a user runs it: a pipe is buffered
    proc = subprocess.Popen([sys.executable, "-m", "moshi_mlx.run_inference", str(long_wav), *stt_files],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arrivals: list[tuple[float, str]] = []
    try:
        first = proc.stdout.readline()
        arrivals.append((time.monotonic(), first))
        running_at_first_word = proc.poll() is None
        for line in proc.stdout:
            arrivals.append((time.monotonic(), line))
        err = proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert len(arrivals) > 2 and all(len(line.split()) == 3 for _, line in arrivals)
    assert running_at_first_word and "transcribed" in err  # the summary line comes after the last word
    assert arrivals[-1][0] - arrivals[0][0] > 0.1  # one flush per word, not one at the end
    starts = [float(line.split()[0]) for _, line in arrivals]
    assert starts[-1] > starts[0] + seconds / 3  # words from all along the file
