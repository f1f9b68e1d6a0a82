"""`python -m moshi_mlx.run_inference`: file in, Moshi's audio and transcript out, with the demo model.

Inputs are real speech from espeak-ng, converted by sox to the rates, channel counts and sample
formats people have. Nothing is faked except the model (the tiny random demo model, which babbles).
The long-session case uses a Mimi whose instances are retired after 10 frames instead of 4092 (the
wrapper's ``max_frames``), so a few seconds of audio exercise what a 6-minute file would.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.audio.files import AudioFileError, load_mono_24k, read_audio
from moshi_mlx.run_inference import convert_file
from tests.helpers.audio_env import (
    ROOT,
    SPEECH_TOOLS,
    active_fraction,
    base_env,
    missing,
    rms,
    speech_wav,
)

SHORT = "Hello there, can you hear me?"  # ~2.4 s: the demo model needs ~0.1-0.3 s per frame here


@pytest.fixture(scope="module")
def speech_tools():
    lacking = missing(*SPEECH_TOOLS)
    if lacking:
        pytest.skip(f"needs {', '.join(lacking)} (apt install espeak-ng sox)")


@pytest.fixture(scope="module")
def demo():
    from moshi_mlx.model_files.assets import load

    return load(demo=True, log=lambda m: None)


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moshi_mlx.run_inference", *args], env=base_env(), cwd=ROOT, capture_output=True,
        text=True, timeout=timeout,
    )


def _wav_info(path: Path) -> tuple[int, int, int, int]:
    import wave

    with wave.open(str(path)) as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


def _check_transcript(t: dict, frames: int) -> None:
    assert t["sample_rate"] == 24000 and t["frame_seconds"] == 0.08 and t["frames"] == frames
    starts = [p["start"] for p in t["pieces"]]
    assert starts == sorted(set(starts)), "timestamps must increase"
    for p in t["pieces"]:
        assert set(p) == {"frame", "start", "text"}
        assert 0 <= p["frame"] < frames and p["start"] == round(p["frame"] * 0.08, 3)
        assert isinstance(p["text"], str) and p["text"].strip()
    assert t["text"] == "".join(p["text"] for p in t["pieces"]).strip()


def test_cli_44k_stereo(speech_tools, tmp_path):
    src = speech_wav(tmp_path / "in.wav", SHORT, rate=44100, channels=2)
    n_in = _wav_info(src)[3]
    r = _run([str(src), str(tmp_path / "out.wav"), "--transcript", str(tmp_path / "t.json"), "--demo"])
    assert r.returncode == 0, r.stderr
    assert "DEMO MODE" in r.stderr and "100%|" in r.stderr and "slower than real time" in r.stderr and "Traceback" not in r.stderr
    rate, channels, width, n_out = _wav_info(tmp_path / "out.wav")
    assert (rate, channels, width) == (24000, 1, 2)
    assert n_out == round(n_in * 24000 / 44100)  # exactly the input's duration
    assert abs(n_out / 24000 - n_in / 44100) < 1 / 24000
    out, _ = read_audio(tmp_path / "out.wav")
    assert active_fraction(out[0], 24000) > 0.5  # Moshi's (babbling) voice, after the first frame(s)
    t = json.loads((tmp_path / "t.json").read_text())
    _check_transcript(t, frames=-(-n_out // 1920))
    assert len(t["pieces"]) >= 3
    assert t["duration"] == pytest.approx(n_in / 44100, abs=1e-4)


def test_16k_mono_in_process(speech_tools, demo, tmp_path):
    src = speech_wav(tmp_path / "in16.wav", SHORT, rate=16000)
    t = convert_file(demo.engine(), src, tmp_path / "out.wav", tmp_path / "t.json")
    n_in = _wav_info(src)[3]
    assert _wav_info(tmp_path / "out.wav") == (24000, 1, 2, round(n_in * 1.5))
    _check_transcript(json.loads((tmp_path / "t.json").read_text()), frames=-(-round(n_in * 1.5) // 1920))
    assert t["input_duration"] == pytest.approx(n_in / 16000)


def test_long_input_crosses_mimi_handoffs(speech_tools, demo, tmp_path):
    """Each rustymimi instance gets 10 frames here instead of ~4092 (5.5 min): the same code path a
    long file takes, handoffs included, in 3 s of audio."""
    from moshi_mlx.audio.mimi import Mimi
    from moshi_mlx.engine import ConversationEngine
    from moshi_mlx.model_files.stand_ins import demo_assets

    mimi = Mimi(demo_assets().mimi_path, max_frames=10, overlap_frames=3)
    engine = ConversationEngine(demo.lm, mimi, demo.tokenizer)
    src = speech_wav(tmp_path / "in.wav", "One two three four five six seven eight.", rate=22050)
    pcm, _ = load_mono_24k(src)
    frames = -(-pcm.size // 1920)
    assert frames > 25
    t = convert_file(engine, src, tmp_path / "out.wav", tmp_path / "t.json")
    assert mimi.encoder_handoffs >= 2 and mimi.decoder_handoffs >= 2, mimi
    out, rate = read_audio(tmp_path / "out.wav")
    assert rate == 24000 and out.shape == (1, pcm.size)
    assert np.isfinite(out).all() and active_fraction(out[0, -10 * 1920 :], 24000) > 0.5  # still talking at the end
    _check_transcript(t, frames)


# ------------------------------------------------------------------------------------------------
# Reading audio files
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(speech_tools, tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    src = speech_wav(d / "s16.wav", SHORT, rate=16000)
    x, rate = read_audio(src)
    return d, src, x, rate


@pytest.mark.parametrize(
    "sox_args,tol",
    [
        (["-e", "signed-integer", "-b", "24"], 0.0),  # WAVE_FORMAT_EXTENSIBLE
        (["-e", "signed-integer", "-b", "32"], 0.0),  # WAVE_FORMAT_EXTENSIBLE
        (["-e", "floating-point", "-b", "32"], 0.0),
        (["-e", "floating-point", "-b", "64"], 0.0),
        (["-e", "unsigned-integer", "-b", "8", "-D"], 1 / 128),
        (["-t", "flac"], 0.0),  # not WAV: decoded by sphn
    ],
)
def test_read_audio_formats(reference, sox_args, tol):
    d, src, x16, rate = reference
    suffix = ".flac" if "flac" in sox_args else ".wav"
    path = d / ("conv_" + "_".join(a.strip("-") for a in sox_args) + suffix)
    subprocess.run(["sox", str(src), *sox_args, str(path)], check=True, capture_output=True)
    x, r = read_audio(path)
    assert r == rate and x.dtype == np.float32 and x.shape == x16.shape
    assert np.abs(x - x16).max() <= tol + 1e-7


def test_read_audio_stereo_and_resampling(reference):
    d, src, x16, _ = reference
    stereo = d / "st.wav"
    subprocess.run(["sox", str(src), "-r", "48000", "-c", "2", str(stereo)], check=True, capture_output=True)
    x, rate = read_audio(stereo)
    assert rate == 48000 and x.shape[0] == 2
    mono, dur = load_mono_24k(stereo)
    assert mono.size == round(x.shape[1] / 2) and dur == pytest.approx(x.shape[1] / 48000)
    assert rms(mono) == pytest.approx(rms(x.mean(axis=0)), rel=0.05)


def _wav_header(n_data: int, tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16) -> bytes:
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    riff = struct.pack("<I", min(4 + 8 + len(fmt) + 8 + n_data, 0xFFFFFFFF))
    return b"RIFF" + riff + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", n_data)


@pytest.mark.parametrize("declared", [0, 0xFFFFFFFF])
@pytest.mark.parametrize("bits", [16, 32])
def test_unfinished_recording_is_read(tmp_path, declared, bits):
    """A recorder that never finalised its header: the data size is 0 or 0xFFFFFFFF (a size larger than the
    file is a file cut short: refused, see test_bad_inputs)."""
    p = tmp_path / "trunc.wav"
    p.write_bytes(_wav_header(declared, bits=bits) + np.arange(100, dtype=f"<i{bits // 8}").tobytes())
    x, rate = read_audio(p)
    assert rate == 16000 and x.shape == (1, 100) and x[0, 5] == pytest.approx(5 / 2 ** (bits - 1))


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "file is empty"),
        (lambda p: p.write_text("hello, I am not audio\n" * 20), "not an audio file this tool can read"),
        (lambda p: p.write_bytes(_wav_header(0)), "contains no audio samples"),
        (lambda p: p.write_bytes(_wav_header(0)[:-8]), "broken WAV file (Error in WAV file. No 'data' chunk"),
        (lambda p: p.write_bytes(_wav_header(64, tag=0x55) + bytes(64)), "unsupported or broken WAV file"),
        (lambda p: p.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk\x00\x00\x00\x00"), "unsupported or broken WAV file"),
        (lambda p: p.mkdir(), "is a directory"),
        # a copy cut short: libsndfile read the 0.02 s that were there and said nothing
        (lambda p: p.write_bytes(_wav_header(1_000_000) + bytes(200)),
         "truncated WAV: its header promises 1000000 bytes of audio, the file holds 200"),
        # Voice Memos' .m4a (AAC in MP4): libsndfile cannot; the line names the conversion
        (lambda p: p.write_bytes(b"\x00\x00\x00\x1cftypM4A \x00\x00\x02\x00M4A isommp42" + bytes(256)),
         "an MP4/M4A (AAC) file, which this tool cannot decode; convert it to WAV first: `afconvert -f WAVE -d LEI16"),
    ],
)
def test_bad_inputs(tmp_path, make, needle):
    p = tmp_path / "bad.wav"
    make(p)
    with pytest.raises(AudioFileError) as e:
        read_audio(p)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("kind", ["missing", "text", "empty"])
def test_cli_bad_input_is_one_line(tmp_path, kind):
    p = tmp_path / f"{kind}.wav"
    if kind == "text":
        p.write_text("not audio")
    elif kind == "empty":
        p.write_bytes(b"")
    r = _run([str(p), str(tmp_path / "out.wav"), "--demo"])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {p}: "), r.stderr
    assert not (tmp_path / "out.wav").exists()


def test_output_format_follows_the_name(demo, tmp_path):
    """out.flac is FLAC (it was a WAV under a .flac name); an extension it cannot write is refused up front."""
    import soundfile as sf

    from moshi_mlx.audio.files import output_format

    src = _tone_wav(tmp_path / "in.wav", seconds=0.4)
    engine = demo.engine()
    try:
        convert_file(engine, src, tmp_path / "out.flac")
    finally:
        engine.close()
    info = sf.info(str(tmp_path / "out.flac"))
    assert info.format == "FLAC" and info.samplerate == 24000 and info.frames == round(0.4 * 24000)
    with pytest.raises(AudioFileError, match=r"out\.mp3: cannot write \.mp3 files; name the output \.wav, \.flac"):
        output_format(tmp_path / "out.mp3")
    r = _run([str(src), str(tmp_path / "out.mp3"), "--demo"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot write .mp3" in r.stderr, r.stderr


def test_cli_output_directory_missing(speech_tools, tmp_path):
    src = speech_wav(tmp_path / "in.wav", "Hi.", rate=24000)
    r = _run([str(src), str(tmp_path / "nodir" / "out.wav"), "--demo"])
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "does not exist" in r.stderr
    assert "DEMO MODE" not in r.stderr  # nothing loaded


def _tone_wav(path: Path, seconds: float = 1.0) -> Path:
    import wave

    t = np.arange(int(seconds * 24000)) / 24000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(24000), w.writeframes(pcm.tobytes())
    return path


def test_cli_sampling_controls_and_seeds(tmp_path):
    """--text-seed/--audio-seed replay a run (and beat --seed); --pad-mult really reaches the sampler."""
    src = _tone_wav(tmp_path / "in.wav")

    def run(name: str, *flags: str) -> tuple[bytes, dict]:
        out, transcript = tmp_path / f"{name}.wav", tmp_path / f"{name}.json"
        r = _run([str(src), str(out), "--transcript", str(transcript), "--demo", *flags])
        assert r.returncode == 0, r.stderr
        return out.read_bytes(), json.loads(transcript.read_text())

    common = ["--repetition-penalty", "1.3", "--repetition-penalty-context", "16", "--text-temperature", "1.5"]
    a_wav, a_text = run("a", "--text-seed", "5", "--audio-seed", "6", *common)
    b_wav, b_text = run("b", "--seed", "99", "--text-seed", "5", "--audio-seed", "6", *common)
    assert a_wav == b_wav
    assert a_text["pieces"] == b_text["pieces"]
    assert len(a_text["pieces"]) >= 3  # the babbling demo model says "words"...
    _, quiet = run("c", "--text-seed", "5", "--audio-seed", "6", "--pad-mult", "40", *common)
    assert quiet["pieces"] == []  # ...unless padding is made e^40 times likelier


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--repetition-penalty", "0", "must be > 0"),
        ("--repetition-penalty-context", "-3", "must be >= 0"),
        ("--pad-mult", "nan", "finite"),
        ("--text-seed", "x", "must be an integer"),
        ("--audio-seed", "-1", "must be >= 0"),
        ("--text-temperature", "-0.5", "must be >= 0"),
    ],
)
def test_cli_bad_sampling_values_fail_before_loading(tmp_path, flag, value, fragment):
    r = _run([str(tmp_path / "in.wav"), str(tmp_path / "out.wav"), "--demo", f"{flag}={value}"], timeout=60)
    assert r.returncode == 2
    error = r.stderr.strip().splitlines()[-1]
    assert flag in error and fragment in error, r.stderr
    assert "DEMO MODE" not in r.stderr and "Traceback" not in r.stderr


def test_cli_persona_prompt_and_voice(tmp_path):
    """--text-prompt / --text-prompt-file / --voice on the demo model (PersonaPlex's 8 + 8 codebooks of 2048: a
    persona stand-in): the prompt reaches the model, a bad voice is one line before anything loads."""
    src = _tone_wav(tmp_path / "in.wav")
    voice = tmp_path / "voice.wav"
    t = np.arange(24_000) / 24_000
    pcm = (8000 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype("<i2")
    import wave

    with wave.open(str(voice), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(24000), w.writeframes(pcm.tobytes())
    (tmp_path / "role.txt").write_text("You are Ada, a patient teacher.")

    def run(name: str, *flags: str) -> bytes:
        out = tmp_path / f"{name}.wav"
        r = _run([str(src), str(out), "--demo", "--seed", "4", *flags])
        assert r.returncode == 0, r.stderr
        return out.read_bytes()

    plain = run("plain")
    prompted = run("prompted", "--text-prompt", "You are Ada, a patient teacher.", "--voice", str(voice))
    from_file = run("file", "--text-prompt-file", str(tmp_path / "role.txt"), "--voice", str(voice))
    assert prompted == from_file and prompted != plain

    for flags, needle in [
        (["--voice", str(tmp_path / "in.txt")], "no such file"),
        (["--voice", "NATF9", "--voices-dir", str(tmp_path)], "unknown voice 'NATF9'"),
        (["--text-prompt-file", str(tmp_path / "none.txt")], "cannot be read"),
    ]:
        r = _run([str(src), str(tmp_path / "x.wav"), "--demo", *flags], timeout=60)
        assert r.returncode != 0 and "Traceback" not in r.stderr and "DEMO MODE" not in r.stderr, r.stderr
        assert needle in r.stderr.strip().splitlines()[-1], r.stderr
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really")
    r = _run([str(src), str(tmp_path / "x.wav"), "--demo", "--voice", str(tmp_path / "noise.wav")], timeout=60)
    assert r.returncode == 1 and "noise.wav" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
