"""Echo cancellation (moshi_mlx.aec) on real speech.

"Moshi" (an espeak-ng voice) plays through the speaker; the microphone picks
up its echo (delayed, attenuated, smeared by a short synthetic room response)
plus, from 7 s on, the "user" (another espeak-ng voice and sentence) and a
little noise.  Timeline (24 kHz, 188 frames of 80 ms = 15.04 s):

    0 ........ 7 s ............ 12.04 s ...... 14.1 s ... 15.04 s
    | echo only | double talk (both) | user only | silence |

Measured (livekit 1.2.1, Linux x86_64; deterministic run to run), echo gain
0.5 (echo about as loud as the user in the double-talk part), noise -55 dBFS:
  * ERLE on the echo-only part after 2 s of convergence: 46.0-46.2 dB for echo
    delays of 40, 120, 250 and 600 ms (600 uses the reference pre-delay path);
    41.7-47 dB already in 0.3-2 s.  Through the sounddevice stream: 44.8 dB.
  * user-only part: energy -0.4 dB vs the clean speech, 20 ms energy-envelope
    correlation 0.99, waveform correlation 0.997 with the canceller's output
    for the clean speech alone (same far signal); output lags by 366 samples.
  * double talk: output envelope tracks the user (0.75-0.83; raw mic
    0.45-0.71) and not the echo (-0.22..0.01); the user is 2.2-3.5 dB quieter
    there (AEC3's suppressor).
  * negative controls (not asserted except the first): reference 160 ms late
    -> ERLE 1.6 dB; no reference at all -> 0.3 dB.
The floors asserted below leave wide margins under these figures.

Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.audio import echo as aec_mod

SR = 24000
FRAME = 1920
N_FRAMES = 188
T = N_FRAMES * FRAME
USER_START_S = 7.0
REPO = Path(__file__).resolve().parents[2]

MOSHI_TEXT = (
    "Sure, I can help with that. Tomorrow in Paris it will be cloudy in the morning "
    "with some rain in the afternoon, so yes, you should bring an umbrella. Is there "
    "anything else you would like to know about your trip?"
)
USER_TEXT = (
    "Hello Moshi, I would like to know what the weather will be like tomorrow in "
    "Paris, and whether I should bring an umbrella."
)

needs_livekit = pytest.mark.skipif(
    not aec_mod.aec_available(), reason="livekit not installed (pip install livekit)"
)


# ----------------------------------------------------------------------------- signals


def _tts(tmp: Path, name: str, voice: str, speed: int, text: str) -> np.ndarray:
    raw, out = tmp / f"{name}_raw.wav", tmp / f"{name}24k.wav"
    # sox -D: no dither, so the signals (and the figures) are the same on every run
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
    subprocess.run(["sox", "-D", str(raw), "-r", str(SR), "-c", "1", "-b", "16", str(out)], check=True)
    with wave.open(str(out)) as w:
        assert w.getframerate() == SR and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install espeak-ng sox)")
    tmp = tmp_path_factory.mktemp("aec_voices")
    moshi = _tts(tmp, "moshi", "en-gb+f3", 160, MOSHI_TEXT)
    user = _tts(tmp, "user", "en-us", 150, USER_TEXT)
    moshi *= 0.7 / np.max(np.abs(moshi))
    user *= 0.5 / np.max(np.abs(user))
    spk = np.zeros(T, np.float32)
    n = min(len(moshi), T)
    spk[:n] = moshi[:n]
    u = np.zeros(T, np.float32)
    s = int(USER_START_S * SR)
    n = min(len(user), T - s)
    u[s : s + n] = user[:n]
    return spk, u


def make_mic(spk, user, delay_ms, gain=0.5, seed=0):
    """Mic = room-smeared, delayed, attenuated speaker signal + user + noise at -55 dBFS."""
    rng = np.random.default_rng(seed)
    n = int(0.03 * SR)  # 30 ms exponentially decaying reflections
    rir = rng.standard_normal(n) * np.exp(-np.arange(n) / (0.006 * SR)) * 0.15
    rir[0] = 1.0
    echo = np.convolve(spk, rir)[:T] * gain
    d = int(delay_ms * SR / 1000)
    echo = np.concatenate([np.zeros(d), echo[: T - d]]).astype(np.float32)
    mic = echo + user + rng.standard_normal(T).astype(np.float32) * 10 ** (-55 / 20)
    return mic.astype(np.float32), echo


def run_canceller(spk, mic, delay_ms):
    ec = aec_mod.EchoCanceller(sample_rate=SR, frame_size=FRAME, delay_ms=delay_ms)
    out = np.zeros(T, np.float32)
    for k in range(0, T, FRAME):
        ec.process_far(spk[k : k + FRAME])
        out[k : k + FRAME] = ec.process_near(mic[k : k + FRAME])
    ec.close()
    return out


# ----------------------------------------------------------------------------- metrics

# The processed mic comes out ~14 ms (about 340-370 samples) late; metrics that
# compare with the clean user signal search this lag.
MAX_LAG = 1200


def _db(x):
    return 10 * np.log10(np.sum(np.asarray(x, np.float64) ** 2) + 1e-20)


def _seg(x, a_s, b_s, lag=0):
    return x[int(a_s * SR) + lag : int(b_s * SR) + lag]


def _lag(out, ref, a_s, b_s):
    x = _seg(out, a_s, b_s + MAX_LAG / SR)
    y = _seg(ref, a_s, b_s)
    # c[L] = sum_t x[t + L] * y[t] for L in 0..MAX_LAG, via FFT
    n = 1 << int(np.ceil(np.log2(len(x) + len(y))))
    c = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(y, n)), n)[: MAX_LAG + 1]
    return int(np.argmax(np.abs(c)))


def _env_corr(x, y, n=480):
    def env(z):
        z = z[: len(z) // n * n].reshape(-1, n).astype(np.float64)
        return 10 * np.log10(np.mean(z**2, axis=1) + 1e-7)

    return float(np.corrcoef(env(x), env(y))[0, 1])


def measure(spk, user, mic, echo, out, ref_out):
    """ref_out: canceller output for the user speech alone (same far signal)."""
    m = {"erle_db": _db(_seg(mic, 2.0, 7.0)) - _db(_seg(out, 2.0, 7.0))}
    m["erle_first_2s_db"] = _db(_seg(mic, 0.3, 2.0)) - _db(_seg(out, 0.3, 2.0))
    for name, (a, b) in {"user_only": (12.3, 14.0), "double_talk": (7.2, 12.0)}.items():
        lag = _lag(out, user, a, b)
        o = _seg(out, a, b, lag)
        m[f"{name}_lag_samples"] = lag
        m[f"{name}_energy_db"] = _db(o) - _db(_seg(user, a, b))
        m[f"{name}_env_corr"] = _env_corr(o, _seg(user, a, b))
        m[f"{name}_mic_env_corr"] = _env_corr(_seg(mic, a, b), _seg(user, a, b))
        m[f"{name}_wave_corr_vs_ref"] = float(
            np.corrcoef(_seg(out, a, b), _seg(ref_out, a, b))[0, 1]
        )
        if name == "double_talk":
            m["double_talk_echo_env_corr"] = _env_corr(o, _seg(echo, a, b))
    return {k: round(float(v), 3) for k, v in m.items()}


def check(m):
    assert m["erle_db"] >= 25.0, m
    assert m["erle_first_2s_db"] >= 15.0, m
    # the user alone passes almost unchanged
    assert -3.0 <= m["user_only_energy_db"] <= 2.0, m
    assert m["user_only_env_corr"] >= 0.9, m
    assert m["user_only_wave_corr_vs_ref"] >= 0.95, m
    # double talk: the user survives (possibly attenuated) and the echo is gone
    assert m["double_talk_energy_db"] >= -10.0, m
    assert m["double_talk_env_corr"] >= 0.5, m
    assert m["double_talk_env_corr"] > m["double_talk_mic_env_corr"], m
    assert m["double_talk_echo_env_corr"] <= 0.25, m
    assert m["double_talk_wave_corr_vs_ref"] >= 0.45, m
    assert 0 <= m["user_only_lag_samples"] <= 720, m  # <= 30 ms of added latency


# ----------------------------------------------------------------------------- tests


def test_unavailable_gives_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "livekit", None)  # makes `import livekit` fail
    assert not aec_mod.aec_available()
    with pytest.raises(aec_mod.AecUnavailable) as ei:
        aec_mod.EchoCanceller()
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("echo cancellation unavailable")
    assert "pip install livekit, or pass --no-aec" in msg


@needs_livekit
def test_argument_checks():
    with pytest.raises(ValueError):
        aec_mod.EchoCanceller(sample_rate=22050)
    with pytest.raises(ValueError):
        aec_mod.EchoCanceller(frame_size=1000)
    with aec_mod.EchoCanceller() as ec:
        with pytest.raises(ValueError):
            ec.process_near(np.zeros(1000, np.float32))
        out = ec.process_near(np.zeros(FRAME, np.float32))
        assert out.dtype == np.float32 and out.shape == (FRAME,)
        assert ec.far_missing_chunks == 8  # no far queued: silence was used
        out = ec.process_near(np.zeros((FRAME, 1), np.float32))  # (n, 1) callback layout
        assert out.shape == (FRAME,)
        with pytest.raises(ValueError):
            ec.process_near(np.zeros((FRAME, 2), np.float32))


@needs_livekit
@pytest.mark.parametrize("delay_ms", [40, 120, 250, 600])
def test_echo_removed_speech_kept(voices, delay_ms):
    spk, user = voices
    mic, echo = make_mic(spk, user, delay_ms)
    out = run_canceller(spk, mic, delay_ms)
    ref_out = run_canceller(spk, user + (mic - echo - user), delay_ms)  # user + noise only
    m = measure(spk, user, mic, echo, out, ref_out)
    print(f"\nAEC delay={delay_ms} ms: {json.dumps(m)}")
    check(m)


@needs_livekit
def test_late_reference_is_not_cancelled(voices):
    """Negative control: a reference that reaches the canceller after its echo
    (here 2 frames late) is useless, so the checks above do measure cancellation.
    The app must call process_far for a frame no later than the mic frame that
    contains its echo."""
    spk, user = voices
    mic, echo = make_mic(spk, user, 120)
    late = np.concatenate([np.zeros(2 * FRAME, np.float32), spk[: -2 * FRAME]])
    out = run_canceller(late, mic, 120)
    erle = _db(_seg(mic, 2.0, 7.0)) - _db(_seg(out, 2.0, 7.0))
    print(f"\nAEC with the reference 160 ms late: ERLE {erle:.1f} dB")
    assert erle < 10.0


@needs_livekit
def test_far_chunking_does_not_matter(voices):
    """Far audio in odd-sized pieces gives the same output as whole frames."""
    spk, user = voices
    mic, _ = make_mic(spk, user, 120)
    whole = run_canceller(spk, mic, 120)
    ec = aec_mod.EchoCanceller(delay_ms=120)
    out = np.zeros(T, np.float32)
    for k in range(0, T, FRAME):
        far = spk[k : k + FRAME]
        ec.process_far(far[:700])
        ec.process_far(far[700:1333])
        ec.process_far(far[1333:])
        out[k : k + FRAME] = ec.process_near(mic[k : k + FRAME])
    assert ec.far_dropped_chunks == 0 and ec.far_missing_chunks == 0
    np.testing.assert_array_equal(out, whole)


@needs_livekit
def test_far_from_another_thread():
    """process_far on one thread, process_near on another: no errors, queue bounded."""
    import threading

    rng = np.random.default_rng(3)
    frames = [rng.standard_normal(FRAME).astype(np.float32) * 0.1 for _ in range(60)]
    ec = aec_mod.EchoCanceller()
    done = threading.Event()

    def speaker():
        for f in frames:
            ec.process_far(f)
        done.set()

    th = threading.Thread(target=speaker)
    th.start()
    outs = [ec.process_near(f * 0.3) for f in frames]
    th.join()
    assert done.is_set()
    assert all(o.shape == (FRAME,) and np.isfinite(o).all() for o in outs)
    fed = 60 * 8 - ec.far_missing_chunks  # far chunks consumed by near
    assert fed + len(ec._far) + ec.far_dropped_chunks == 60 * 8
    ec.close()
    with pytest.raises(RuntimeError):
        ec.process_near(frames[0])


# ------------------------------------------------------------------ real audio devices

_ASOUND_CONF = """\
pcm.aectest_mic {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
pcm.aectest_spk {{
    type file
    slave.pcm "null"
    file "{outfile}"
    format "raw"
}}
"""

# Runs in a subprocess so that PortAudio initialises with our ALSA config
# (ALSA_CONFIG_PATH = system alsa.conf + ours) whatever this process imported.
_DEVICE_WORKER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    try:
        import sounddevice as sd
        sd.query_devices("aectest_mic"); sd.query_devices("aectest_spk")
    except Exception as e:
        print("SKIP:", type(e).__name__, str(e).replace("\\n", " ")); sys.exit(3)
    from moshi_mlx.audio.echo import EchoCanceller
    work, delay_ms, n_frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    spk = np.load(work + "/spk.npy")
    ec = EchoCanceller(sample_rate=24000, frame_size=1920, delay_ms=delay_ms)
    cleaned, captured, state = [], [], {"k": 0, "status": []}

    def callback(indata, outdata, frames, time_info, status):
        k = state["k"]
        if status:
            state["status"].append(str(status))
        assert frames == 1920 and indata.shape == (1920, 1)
        far = spk[k * 1920:(k + 1) * 1920]
        outdata[:, 0] = far                  # what the speaker plays now
        ec.process_far(far)                  # ... is the canceller's reference
        captured.append(indata[:, 0].copy())
        cleaned.append(ec.process_near(indata[:, 0]))
        state["k"] = k + 1
        if state["k"] >= n_frames:
            raise sd.CallbackStop

    with sd.Stream(device=("aectest_mic", "aectest_spk"), samplerate=24000, blocksize=1920,
                   channels=1, dtype="float32", callback=callback) as st:
        t0 = time.monotonic()
        while st.active and time.monotonic() - t0 < 30:
            time.sleep(0.01)
    np.save(work + "/cleaned.npy", np.concatenate(cleaned))
    np.save(work + "/captured.npy", np.concatenate(captured))
    print("OK frames=%d status=%s" % (state["k"], state["status"]))
    """
)


@needs_livekit
def test_through_sounddevice_streams(voices, tmp_path):
    """Duplex sounddevice stream on ALSA file+null devices (bit-exact, unpaced).

    The mic device reads the echo+speech mix from a file; each callback plays the
    next Moshi frame, gives it to the canceller as reference and cleans the mic
    block, as the app's audio path would.
    """
    alsa_conf = Path("/usr/share/alsa/alsa.conf")
    if not alsa_conf.exists():
        pytest.skip("ALSA configuration (/usr/share/alsa/alsa.conf) not found")
    spk, user = voices
    delay_ms = 100
    mic, echo = make_mic(spk, user, delay_ms, seed=1)
    mic.astype("<f4").tofile(tmp_path / "mic.f32")
    np.save(tmp_path / "spk.npy", spk)
    conf = tmp_path / "asound.conf"
    conf.write_text(
        _ASOUND_CONF.format(infile=tmp_path / "mic.f32", outfile=tmp_path / "spk_out.raw")
    )
    (tmp_path / "worker.py").write_text(_DEVICE_WORKER)
    env = dict(os.environ)
    env["ALSA_CONFIG_PATH"] = f"{alsa_conf}:{conf}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, str(tmp_path / "worker.py"), str(tmp_path), str(delay_ms), str(N_FRAMES)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    skip_line = next((ln for ln in r.stdout.splitlines() if ln.startswith("SKIP:")), None)
    if r.returncode == 3 and skip_line:
        pytest.skip(f"PortAudio/ALSA file devices unavailable: {skip_line[5:].strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    captured = np.load(tmp_path / "captured.npy")
    cleaned = np.load(tmp_path / "cleaned.npy")
    assert captured.shape == cleaned.shape == (T,)
    np.testing.assert_array_equal(captured, mic)  # the device delivered the file exactly
    played = np.fromfile(tmp_path / "spk_out.raw", "<f4")
    np.testing.assert_array_equal(played[2 * FRAME : 2 * FRAME + T - 2 * FRAME], spk[: T - 2 * FRAME])

    ref_out = run_canceller(spk, user + (mic - echo - user), delay_ms)
    m = measure(spk, user, mic, echo, cleaned, ref_out)
    print(f"\nAEC through sounddevice (ALSA file devices), delay={delay_ms} ms: {json.dumps(m)}")
    check(m)
    # same input, same processing: identical to the offline run
    np.testing.assert_array_equal(cleaned, run_canceller(spk, mic, delay_ms))


@needs_livekit
def test_session_reduction_figure(voices):
    """The figure the terminal app prints at the end of a session: echo-only mic -> large reduction."""
    spk, _ = voices
    mic, _ = make_mic(spk, np.zeros_like(spk), 120)
    ec = aec_mod.EchoCanceller(sample_rate=SR, frame_size=FRAME, delay_ms=120)
    assert ec.reduction_db is None
    for k in range(0, T, FRAME):
        ec.process_far(spk[k : k + FRAME])
        ec.process_near(mic[k : k + FRAME])
    reduction = ec.reduction_db
    ec.reset()
    assert ec.reduction_db is None
    ec.close()
    assert reduction is not None and reduction > 20.0, reduction


# ------------------------------------------------------------------------------------------------
# The session figure is only reported when it is measurable (no "116.1 dB removed" from a silent mic)
# ------------------------------------------------------------------------------------------------


def _energy(x: np.ndarray) -> float:
    return float(np.square(x.astype(np.float64)).sum())


def _babble(seconds: float, level: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (level * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


def test_measure_reduction_real_echo():
    echo = _babble(3.0, 0.1, 0)
    residual = 0.01 * echo  # 40 dB below the echo, well above the residual floor
    r = aec_mod.measure_reduction(_energy(echo), _energy(residual), echo.size, SR)
    assert r.db is not None and abs(r.db - 40.0) < 0.01 and not r.at_least
    assert r.describe() == "40.0 dB removed from the mic while Moshi was speaking"


def test_measure_reduction_silent_mic_has_no_echo_to_measure():
    # An ALSA file device's mic: digital silence with a stray LSB; the noise suppressor leaves zeros.
    mic = np.zeros(3 * SR, np.float32)
    mic[::997] = 1 / 32768
    for out in (0.0, _energy(mic) * 1e-12):
        r = aec_mod.measure_reduction(_energy(mic), out, mic.size, SR)
        assert r.db is None and r.describe().startswith("no echo to measure (the mic heard nearly nothing"), r
    r = aec_mod.measure_reduction(0.0, 0.0, mic.size, SR)  # true silence
    assert r.db is None


def test_measure_reduction_no_echo_and_too_little_speech():
    user = _babble(3.0, 0.1, 1)  # the user talks, nothing of Moshi reaches the mic: nothing is removed
    r = aec_mod.measure_reduction(_energy(user), _energy(0.95 * user), user.size, SR)
    assert r.db is not None and r.db < aec_mod.MIN_REPORTED_DB
    assert r.describe().startswith("nothing measurable removed")
    short = _babble(0.5, 0.1, 2)  # Moshi played half a second: no figure
    r = aec_mod.measure_reduction(_energy(short), 0.0, short.size, SR)
    assert r.db is None and "less than 1 s" in r.describe()


def test_measure_reduction_below_the_floor_is_a_lower_bound():
    echo = _babble(3.0, 0.1, 3)
    r = aec_mod.measure_reduction(_energy(echo), 0.0, echo.size, SR)
    level_in = 10 * np.log10(_energy(echo) / echo.size)
    assert r.at_least and abs(r.db - (level_in - aec_mod.RESIDUAL_FLOOR_DBFS)) < 1e-6
    assert r.describe().startswith("more than ") and r.db < 80


@needs_livekit
def test_canceller_on_a_silent_mic_reports_no_figure():
    """The canceller itself, speaker playing, mic silent but for stray LSBs: no figure (was ~116 dB)."""
    spk = _babble(3.0, 0.3, 4)
    mic = np.zeros_like(spk)
    mic[::997] = 1 / 32768
    ec = aec_mod.EchoCanceller(sample_rate=SR, frame_size=FRAME, delay_ms=120)
    try:
        for k in range(0, spk.size - FRAME + 1, FRAME):
            ec.process_far(spk[k : k + FRAME])
            ec.process_near(mic[k : k + FRAME])
        assert ec.reduction_db is None and ec.reduction.describe().startswith("no echo to measure"), ec.reduction
    finally:
        ec.close()
