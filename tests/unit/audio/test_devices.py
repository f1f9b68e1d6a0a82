"""moshi_mlx.audio.devices and .device_choice: resampling (soxr, through frames.Resampler), device selection, and the DuplexAudio data path.

Three levels:
* pure numpy checks of the resampler;
* device selection and the callbacks' logic against an in-process fake of ``sounddevice`` (faked
  because this machine has no sound card, and because it lets a test drive the callbacks block by
  block and refuse 24 kHz on purpose);
* the real thing: PortAudio through ALSA ``file``+``null`` devices in a child process (a private
  HOME with its own .asoundrc), bit-exact in both directions, for separate and duplex streams.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moshi_mlx.audio import device_choice
from moshi_mlx.audio.device_choice import AudioDeviceError, find_device
from moshi_mlx.audio.devices import DuplexAudio
from moshi_mlx.audio.frames import FRAME_SIZE, Resampler, resample
from tests.helpers.audio_env import ROOT, FakeSD, alsa_file_env, portaudio_problem, rms

# ------------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------------

RATE_PAIRS = [
    (48000, 24000), (44100, 24000), (16000, 24000), (22050, 24000), (8000, 24000), (24000, 48000), (24000, 44100)
]


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)


@pytest.mark.parametrize("src,dst", RATE_PAIRS)
def test_resample_tone_is_accurate_and_aligned(src, dst):
    nyquist = min(src, dst) / 2  # flat to 0.8 of the lower Nyquist frequency (9.6 kHz at 24 kHz)
    for freq in (440.0, 0.4 * nyquist, 0.8 * nyquist):
        x = _tone(freq, src, 1.0)
        y = resample(x, src, dst)
        assert y.dtype == np.float32 and y.size == round(x.size * dst / src)
        ref = np.sin(2 * np.pi * freq * np.arange(y.size) / dst)
        edge = dst // 20  # the ends see the zero padding
        assert np.abs(y - ref)[edge:-edge].max() < 1e-3, (freq, np.abs(y - ref)[edge:-edge].max())


@pytest.mark.parametrize("src", [48000, 44100, 32000])
def test_resample_rejects_frequencies_above_the_new_nyquist(src):
    x = _tone(0.56 * 24000, src, 0.5)  # 13.4 kHz: above 12 kHz, would alias to 10.6 kHz
    y = resample(x, src, 24000)
    assert rms(y[1200:-1200]) < 1e-3 * rms(x)  # better than -60 dB


@pytest.mark.parametrize("src,dst", RATE_PAIRS)
def test_streaming_resampler_ignores_block_sizes_and_matches_one_shot(src, dst):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(src // 2) * 0.1).astype(np.float32)
    r = Resampler(src, dst)
    blocks = np.split(x, np.cumsum(rng.integers(1, 3000, 40)))
    streamed = [r.process(b) for b in blocks]
    # latency is soxr's filter delay and buffering only: once running, output trails input by < 45 ms
    # (HQ measured: about 20 ms median, 37 ms at worst; the price of 0.02 ms instead of 0.5 ms per block)
    got_in = np.cumsum([b.size for b in blocks]) * dst / src
    got_out = np.cumsum([y.size for y in streamed])
    flowing = (got_in > 0.08 * dst) & (np.array([b.size for b in blocks]) > 0)
    late_ms = 1e3 * (got_in - got_out)[flowing] / dst
    if min(src, dst) >= 16000:  # the filter is longer (in time) at lower rates, e.g. about 70 ms from 8 kHz
        assert late_ms.max() < 45, late_ms.max()
    streamed = np.concatenate(streamed + [r.process(np.zeros(0, np.float32), last=True)])
    np.testing.assert_allclose(streamed, resample(x, src, dst), atol=1e-6)  # delay compensated, nothing lost


def test_resampler_passthrough_and_shapes():
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(Resampler(24000, 24000).process(x), x)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
    stereo = np.stack([_tone(440, 44100, 0.2), _tone(880, 44100, 0.2)])
    assert resample(stereo, 44100, 24000).shape == (2, round(stereo.shape[1] * 24000 / 44100))
    assert resample(np.zeros(0, np.float32), 44100, 24000).size == 0
    with pytest.raises(ValueError):
        Resampler(0, 24000)


# ------------------------------------------------------------------------------------------------
# A fake sounddevice (see the module docstring for why)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_sd(monkeypatch):
    sd = FakeSD()
    monkeypatch.setattr(device_choice, "sounddevice_module", lambda: sd)
    return sd


def test_find_device_by_index_name_and_default(fake_sd):
    assert find_device(None, "input") == 0 and find_device(None, "output") == 1
    assert find_device(2, "output") == 2 and find_device("2", "input") == 2
    assert find_device("built-in mic", "input") == 0
    assert find_device("usb headset", "input") == 2  # the exact name wins over 'USB Headset Monitor'
    assert find_device("monitor", "input") == 3
    assert find_device("headset", "output") == 2  # only one of the two has outputs


@pytest.mark.parametrize(
    "spec,kind,needle",
    [
        ("nonexistent", "input", "--input-device 'nonexistent': no such input device"),
        (7, "output", "--output-device 7: no such device"),
        (0, "output", "has no output channels"),
        ("Built-in Output", "input", "has no input channels"),
        ("headset", "input", "matches several input devices"),
    ],
)
def test_find_device_errors_are_one_line(fake_sd, spec, kind, needle):
    with pytest.raises(AudioDeviceError) as e:
        find_device(spec, kind)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_no_default_device(fake_sd):
    fake_sd.default.device = [-1, -1]
    fake_sd.query_devices = lambda device=None, kind=None: (
        [] if device is None and kind is None else (_ for _ in ()).throw(FakeSD.PortAudioError("no default"))
    )
    with pytest.raises(AudioDeviceError, match="no default input device"):
        find_device(None, "input")


def test_list_devices_marks_defaults(fake_sd):
    text = device_choice.list_devices()
    assert "> " in text and " 0 Built-in Microphone" in text and "44100 Hz" in text
    lines = text.splitlines()
    assert lines[0].startswith(">") and lines[1].startswith(" <")


def test_duplex_audio_resamples_a_44k_mic_and_48k_speaker(fake_sd):
    """Mic only takes 44.1 kHz, speaker 2 only 48 kHz: two streams with 80 ms blocks at those rates."""
    got = []
    a = DuplexAudio(got.append, "built-in microphone", 2, max_queued=4)
    assert (a.input_rate, a.output_rate) == (44100, 48000)
    assert "resampled" in a.describe()
    a.start()
    mic, spk = fake_sd.streams
    assert (mic.kind, mic.samplerate, mic.blocksize) == ("input", 44100, 3528)
    assert (spk.kind, spk.samplerate, spk.blocksize) == ("output", 48000, 3840)

    x = _tone(440, 44100, 1.0)
    for i in range(0, x.size - 3528 + 1, 3528):
        mic.callback(x[i : i + 3528, None], 3528, None, 0)
    assert len(got) >= 11 and all(f.shape == (FRAME_SIZE,) and f.dtype == np.float32 for f in got)
    y = np.concatenate(got)
    r = Resampler(44100, 24000)
    np.testing.assert_allclose(y, r.process(x)[: y.size], atol=1e-6)  # same as the streaming resampler

    frames = [_tone(300 + 100 * i, 24000, 0.08) for i in range(3)]
    for f in frames:
        a.play(f)
    outs = []
    for _ in range(5):
        out = np.zeros((3840, 1), np.float32)
        spk.callback(out, 3840, None, 0)
        outs.append(out[:, 0].copy())
    expected = Resampler(24000, 48000).process(np.concatenate(frames + [np.zeros(2 * FRAME_SIZE, np.float32)]))
    played = np.concatenate(outs)
    assert played.size >= expected.size  # the callback keeps feeding silence, so soxr releases more
    np.testing.assert_allclose(played[: expected.size], expected, atol=1e-6)
    # 5 blocks of 80 ms: 3 frames, then silence; soxr's delay (about 20 ms) needs one more frame to fill the last block
    assert a.stats.played_frames == 3 and a.stats.underruns == 3
    a.close()
    assert not mic.active and not spk.active


class RecordingEcho:
    """Stands in for moshi_mlx.audio.echo.EchoCanceller: logs the calls, "cancels" by replacing the mic."""

    def __init__(self):
        self.calls = []

    def process_far(self, pcm):
        self.calls.append(("far", pcm.copy()))

    def process_near(self, pcm):
        self.calls.append(("near", pcm.copy()))
        return np.full_like(pcm, 0.25)


def test_duplex_audio_one_device_one_stream_and_echo_hook(fake_sd):
    fake_sd.rates[2] = {24000, 48000}
    got, echo = [], RecordingEcho()
    a = DuplexAudio(got.append, 2, 2, max_queued=2, echo_canceller=echo).start()
    (s,) = fake_sd.streams
    assert (s.kind, s.samplerate, s.blocksize) == ("duplex", 24000, FRAME_SIZE)
    frames = [np.full(FRAME_SIZE, v, np.float32) for v in (0.1, 0.2, 0.3)]
    for f in frames:
        a.play(f)
    assert a.stats.overflows == 1  # bound 2: the oldest (0.1) was dropped
    for k in range(4):
        inp = np.full((FRAME_SIZE, 1), k / 10, np.float32)
        out = np.zeros((FRAME_SIZE, 1), np.float32)
        s.callback(inp, out, FRAME_SIZE, None, 0)
        assert out[0, 0] == pytest.approx([0.2, 0.3, 0.0, 0.0][k])
        # each tick: the frame sent to the speaker reaches the hook first, then this tick's mic block
        (kind_far, far), (kind_near, near) = echo.calls[2 * k : 2 * k + 2]
        assert (kind_far, kind_near) == ("far", "near")
        assert np.all(far == out[:, 0]) and np.all(near == np.float32(k / 10))
    assert all(np.all(g == 0.25) for g in got) and len(got) == 4
    assert a.stats.underruns == 2


def test_microphone_alone_for_captions(fake_sd):
    """playback=False (live captions): one input stream, even on a duplex device; no speaker looked up at all."""
    fake_sd.rates[2] = {24000, 48000}
    fake_sd.check_output_settings = lambda *a, **k: (_ for _ in ()).throw(AssertionError("speaker looked up"))
    got = []
    a = DuplexAudio(got.append, 2, None, playback=False).start()
    (s,) = fake_sd.streams
    assert (s.kind, s.samplerate) == ("input", 24000)
    assert a.describe() == "mic: 2 'USB Headset' (24000 Hz)"
    s.callback(np.full((FRAME_SIZE, 1), 0.5, np.float32), FRAME_SIZE, None, 0)
    assert len(got) == 1 and np.all(got[0] == 0.5)
    a.close()


def test_callback_exception_is_kept_and_plays_silence(fake_sd):
    def boom(frame):
        raise RuntimeError("consumer broke")

    fake_sd.rates[2] = {24000}
    a = DuplexAudio(boom, 2, 2).start()
    a.play(np.ones(FRAME_SIZE, np.float32))
    out = np.ones((FRAME_SIZE, 1), np.float32)
    fake_sd.streams[0].callback(np.zeros((FRAME_SIZE, 1), np.float32), out, FRAME_SIZE, None, 0)
    assert isinstance(a.callback_error, RuntimeError) and not out.any()


def test_callback_exception_in_separate_streams(fake_sd):
    a = DuplexAudio(lambda f: None, 0, 1).start()
    mic, spk = fake_sd.streams
    a._spk_resampler = None  # break the speaker path on purpose
    a.play(np.ones(FRAME_SIZE, np.float32))
    a.output_rate = 48000  # forces the resampling branch, which now fails
    out = np.ones((3840, 1), np.float32)
    spk.callback(out, 3840, None, 0)
    assert a.callback_error is not None and not out.any()
    mic.callback(np.zeros((3528, 1), np.float32), 3528, None, 0)  # the input stream is unaffected


def test_device_without_any_usable_rate(fake_sd):
    fake_sd.rates[0] = set()
    with pytest.raises(AudioDeviceError, match="accepts no usable mono float32 format"):
        DuplexAudio(lambda f: None, 0, 1)


def test_macos_refusing_the_microphone_is_said_as_such(fake_sd):
    """CoreAudio's -66748 (no permission) read as "accepts no usable mono float32 format": now the fix is named.
    The refusal is stood in (no Mac here): PortAudio's words as sounddevice raises them."""

    def refuse(device, samplerate, **kw):
        raise fake_sd.PortAudioError(
            "Error opening InputStream: Unanticipated host error [PaErrorCode -9999]: "
            "'AUHAL component not found or unusable' [Core Audio error -66748]")

    fake_sd.check_input_settings = refuse
    with pytest.raises(AudioDeviceError) as e:
        DuplexAudio(lambda f: None, 0, 1)
    assert str(e.value) == (
        "the microphone cannot be opened: macOS refuses it (CoreAudio error -66748); allow the microphone for your "
        "terminal app in System Settings → Privacy & Security → Microphone, then restart the terminal")


# ------------------------------------------------------------------------------------------------
# Real PortAudio, ALSA file devices
# ------------------------------------------------------------------------------------------------

_PROBE = r"""
import json, sys, threading
import numpy as np
from moshi_mlx.audio.devices import DuplexAudio
from moshi_mlx.audio.frames import FRAME_SIZE
mic_dev, spk_dev, n_mic, out_npz = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
got, played_seen = [], []
done = threading.Event()
def on_input(f):
    got.append(f.copy())
    if len(got) >= n_mic:
        done.set()
class Echo:
    def process_far(self, pcm):
        played_seen.append(pcm.copy())
    def process_near(self, pcm):
        return pcm * 0.5
rng = np.random.default_rng(0)
frames = [rng.uniform(-0.5, 0.5, FRAME_SIZE).astype(np.float32) for _ in range(10)]
a = DuplexAudio(on_input, mic_dev, spk_dev, max_queued=16, echo_canceller=Echo())
for f in frames:
    a.play(f)
import time
with a:
    ok = done.wait(20)
    # the speaker runs on its own stream: let it play the 10 frames and a few blocks of silence
    # (PortAudio keeps ~2 blocks buffered; abort would drop them)
    deadline = time.monotonic() + 20
    while (a.stats.played_frames < 10 or a.stats.underruns < 6) and time.monotonic() < deadline:
        time.sleep(0.001)
np.savez(out_npz, got=np.stack(got[:n_mic]), played=np.stack(played_seen[:n_mic]), frames=np.stack(frames))
print(json.dumps({"ok": ok, "describe": a.describe(), "stats": vars(a.stats), "streams": 0}))
"""


@pytest.fixture(scope="module")
def portaudio():
    problem = portaudio_problem()
    if problem:
        pytest.skip(f"PortAudio not usable here: {problem} (apt install libportaudio2)")


@pytest.mark.parametrize("mic,spk", [("fakemic_raw", "fakespk_raw"), ("fakeduplex_raw", "fakeduplex_raw")])
def test_alsa_file_devices_bit_exact(portaudio, tmp_path, mic, spk):
    rng = np.random.default_rng(5)
    mic_signal = rng.uniform(-0.9, 0.9, 40 * FRAME_SIZE).astype(np.float32)
    mic_signal.tofile(tmp_path / "mic.f32")
    env = alsa_file_env(tmp_path / "home", tmp_path / "mic.f32", tmp_path / "spk.raw", tmp_path / "dup.raw")
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, mic, spk, "30", str(tmp_path / "r.npz")],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["ok"] and "24000 Hz" in info["describe"] and "resampled" not in info["describe"]
    z = np.load(tmp_path / "r.npz")
    # mic: every sample, through the echo hook's process_near (x0.5), in order from the first one
    np.testing.assert_array_equal(z["got"], mic_signal[: 30 * FRAME_SIZE].reshape(30, FRAME_SIZE) * 0.5)
    # speaker: the ten queued frames, contiguous and exact, after PortAudio's zero prefill
    out = np.fromfile(tmp_path / ("spk.raw" if mic == "fakemic_raw" else "dup.raw"), np.float32)
    expected = z["frames"].reshape(-1)
    start = int(np.flatnonzero(out == expected[0])[0])
    assert start % FRAME_SIZE == 0 and not out[:start].any()
    np.testing.assert_array_equal(out[start : start + expected.size], expected)
    assert info["stats"]["played_frames"] == 10 and info["stats"]["underruns"] > 0
    # the echo hook's far side got exactly what was played, in order, then silence
    for k in range(10):
        np.testing.assert_array_equal(z["played"][k], z["frames"][k])
    assert not z["played"][10:].any()


_NO_PORTAUDIO = (
    "import ctypes.util, sys; ctypes.util.find_library = lambda name: None; "
    "sys.argv = ['moshi_mlx.local'] + sys.argv[1:]; from moshi_mlx.local import console_main; console_main()"
)


def test_missing_portaudio_is_one_line(tmp_path):
    """PortAudio made unfindable in the child (find_library patched): what a user without it sees."""
    r = subprocess.run(
        [sys.executable, "-c", _NO_PORTAUDIO, "--list-devices"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: PortAudio library not found: install PortAudio (Debian/Ubuntu: apt install libportaudio2; "
        "macOS: brew install portaudio)"
    ]
