"""Virtual sound devices and test speech for the audio tests (no sound card needed).

* :class:`JackServer`: a private JACK server on the ``dummy`` driver (real-time 80 ms ticks), under a
  unique server name so parallel runs and other users of JACK on the machine never meet. Every
  client (PortAudio in the app, jack-play, jack-record) must get :attr:`JackServer.env`.
* :func:`alsa_file_env`: an ``.asoundrc`` with ALSA ``file``+``null`` devices in a private HOME (nothing
  global is touched; ALSA_CONFIG_PATH is not used because it would replace alsa.conf itself). These
  devices have no clock: bit-exact and as fast as the CPU, for data-path checks only.
* :func:`speech_wav`: spoken English from espeak-ng, converted with sox to any rate/channels/format.
* :func:`read_wav`: read back what jack-record or the app wrote.

See shared/docs/testing-audio-and-browser.md (the team's shared folder beside the checkout) for the measurements behind these recipes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moshi_mlx.errors import DEBUG_ENV

ROOT = Path(__file__).resolve().parents[2]
JACK_TOOLS = ("jackd", "jack-play", "jack-record", "jack_lsp", "jack_connect", "jack_disconnect")
SPEECH_TOOLS = ("espeak-ng", "sox")


def missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def portaudio_problem() -> str | None:
    """None if sounddevice can load PortAudio, else the reason (checked in a child process)."""
    r = subprocess.run(
        [sys.executable, "-c", "import sounddevice"], capture_output=True, text=True, timeout=60
    )
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or ["cannot import sounddevice"])[-1]


def base_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: the demo assets cache shared with the normal HOME."""
    env = dict(os.environ)
    env.setdefault("MOSHI_MLX_DEMO_DIR", str(Path("~/.cache/moshi_mlx/demo").expanduser()))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop(DEBUG_ENV, None)  # a developer's debug switch must not change what the tests see
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------
# JACK dummy backend
# ------------------------------------------------------------------------------------------------


class JackServer:
    """``jackd --no-realtime -d dummy`` under a private name; use as a context manager.

    JACK keeps every server in a machine-wide registry of 8 slots (/dev/shm/jack-shm-registry) that
    only a clean shutdown (SIGINT/SIGTERM, no stuck client) frees; a server started again under the
    name of a dead one takes its slot back. So the names are a few fixed ones (``moshi_test_0`` ...),
    the first free one is used, and the server is stopped with SIGINT after its clients.
    """

    NAMES = tuple(f"moshi_test_{i}" for i in range(4))

    def __init__(self, rate: int = 24000, period: int = 1920, log_dir: Path | None = None):
        self.rate, self.period = rate, period
        self.log_dir = log_dir or Path("/tmp")
        self.name = ""
        self.env: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self._clients: list[subprocess.Popen] = []

    def start(self, timeout: float = 15.0) -> "JackServer":
        errors = []
        for name in self.NAMES:
            try:
                return self._start(name, timeout)
            except RuntimeError as e:
                errors.append(f"{name}: {e}")
        raise RuntimeError("could not start jackd: " + "; ".join(errors))

    def _start(self, name: str, timeout: float) -> "JackServer":
        self.name = name
        self.env = base_env(JACK_DEFAULT_SERVER=name, JACK_NO_AUDIO_RESERVATION="1", JACK_NO_START_SERVER="1")
        if "system:capture_1" in self.ports():  # someone else's live server of that name
            raise RuntimeError("in use")
        self.log_path = self.log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["jackd", "-n", name, "--no-realtime", "-d", "dummy", "-r", str(self.rate), "-p", str(self.period),
                 "-C", "2", "-P", "2"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"jackd exited with {self.proc.returncode}: {' '.join(tail)}")
            if "system:capture_1" in self.ports():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"jackd did not come up in {timeout} s")

    def stop(self) -> None:
        for p in self._clients:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # clean shutdown: frees the registry slot
            try:
                self.proc.wait(12)  # jackd waits up to 5 s per client that vanished without closing
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "JackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _tool(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=20)

    def ports(self) -> list[str]:
        return self._tool("jack_lsp").stdout.split()

    def wait_for_port(self, name: str, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if name in self.ports():
                return True
            time.sleep(0.1)
        return False

    def connect(self, src: str, dst: str) -> None:
        r = self._tool("jack_connect", src, dst)
        if r.returncode != 0:
            raise RuntimeError(f"jack_connect {src} {dst} failed: {r.stderr.strip()}")

    def disconnect(self, src: str, dst: str) -> None:
        self._tool("jack_disconnect", src, dst)  # fine if they were not connected

    def play_into(self, wav: Path, dst: str) -> subprocess.Popen:
        """Play a WAV file (at the server's rate) into port ``dst`` only (e.g. the app's mic)."""
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        p = subprocess.Popen(["jack-play", str(wav)], env=self.env, **quiet)
        self._clients.append(p)
        port = f"jack-play-{p.pid}:out_1"
        if not self.wait_for_port(port, 10):
            raise RuntimeError("jack-play did not register its port")
        for q in self.ports():  # jack-play auto-connects to system:playback_*
            if q.startswith("system:playback"):
                self.disconnect(port, q)
        self.connect(port, dst)
        return p

    def record(self, src: str, wav: Path, seconds: float) -> subprocess.Popen:
        """Record port ``src`` into a mono WAV for ``seconds`` (jack-record)."""
        p = subprocess.Popen(
            ["jack-record", "-n", "1", "-p", src, "-t", str(max(1, round(seconds))), str(wav)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self._clients.append(p)
        return p


# ------------------------------------------------------------------------------------------------
# ALSA file devices
# ------------------------------------------------------------------------------------------------

ASOUNDRC = """\
pcm.fakemic_raw {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
pcm.fakespk_raw {{
    type file
    slave.pcm "null"
    file "{outfile}"
    format "raw"
}}
pcm.fakeduplexspk_raw {{
    type file
    slave.pcm "null"
    file "{duplex_outfile}"
    format "raw"
}}
pcm.fakeduplex_raw {{
    type asym
    playback.pcm "fakeduplexspk_raw"
    capture.pcm "fakemic_raw"
}}
"""


def alsa_file_env(home: Path, infile: Path, outfile: Path, duplex_outfile: Path | None = None) -> dict:
    """Env with a private HOME holding an .asoundrc with three ALSA devices, none with a clock:

    * ``fakemic_raw`` (capture) reads raw float32 24 kHz mono from ``infile``, zeros after its end;
    * ``fakespk_raw`` (playback) writes raw float32 to ``outfile``;
    * ``fakeduplex_raw`` does both in one device (reads ``infile``, writes ``duplex_outfile``); it is an
      ``asym`` pair, because one ``file`` device with an ``infile`` also writes what it captures to its
      ``file``, clobbering the playback data.
    """
    home.mkdir(parents=True, exist_ok=True)
    duplex_outfile = duplex_outfile or outfile.with_name(outfile.stem + "_duplex" + outfile.suffix)
    (home / ".asoundrc").write_text(ASOUNDRC.format(infile=infile, outfile=outfile, duplex_outfile=duplex_outfile))
    return base_env(HOME=str(home))


# ------------------------------------------------------------------------------------------------
# Speech
# ------------------------------------------------------------------------------------------------

DEFAULT_TEXT = "Hello, this is a test of the speech dialogue system. Can you hear me?"


def speech_wav(
    path: Path,
    text: str = DEFAULT_TEXT,
    rate: int = 24000,
    channels: int = 1,
    encoding: str = "signed-integer",
    bits: int = 16,
    pad: tuple[float, float] = (0.0, 0.0),
) -> Path:
    """espeak-ng speech converted by sox (``encoding``: signed-integer or floating-point)."""
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    cmd = ["sox", str(raw), "-r", str(rate), "-c", str(channels), "-e", encoding, "-b", str(bits), str(path)]
    if pad != (0.0, 0.0):
        cmd += ["pad", str(pad[0]), str(pad[1])]
    subprocess.run(cmd, check=True, capture_output=True)
    raw.unlink()
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of a 16/32-bit int or 32-bit float WAV."""
    from moshi_mlx.audio.files import read_audio

    x, rate = read_audio(path)
    return x.mean(axis=0).astype(np.float32), rate


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def active_fraction(x: np.ndarray, rate: int, threshold: float = 1e-4) -> float:
    """Share of 80 ms blocks whose RMS exceeds ``threshold`` (the demo's random Mimi is quiet: RMS ~1e-3)."""
    n = int(rate * 0.08)
    blocks = x[: x.size // n * n].reshape(-1, n) if x.size >= n else x.reshape(1, -1)
    return float(np.mean(np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1)) > threshold))


# ------------------------------------------------------------------------------------------------
# In-process fake of sounddevice (recipe 2d): for driving DuplexAudio's callbacks directly
# ------------------------------------------------------------------------------------------------


class FakeStream:
    """Records how it was opened. With ``FakeSD(clocked=True)`` a thread calls the callback every
    block (``mic`` supplies the input: a function of the block index) until abort/close."""

    def __init__(self, sd, kind, device, samplerate, blocksize, callback, **kw):
        self.sd, self.kind, self.device = sd, kind, device
        self.samplerate, self.blocksize, self.callback = samplerate, blocksize, callback
        self.active = False
        self.output: list[np.ndarray] = []
        self._thread = None
        sd.streams.append(self)

    def start(self):
        self.active = True
        if self.sd.clocked:
            import threading

            self._thread = threading.Thread(target=self._tick, name="fake-portaudio", daemon=True)
            self._thread.start()

    def _tick(self):
        n, period, i = self.blocksize, self.blocksize / self.samplerate, 0
        t_next = time.monotonic()
        while self.active:
            indata = self.sd.mic(i, n).reshape(n, 1).astype(np.float32)
            outdata = np.zeros((n, 1), np.float32)
            if self.kind == "duplex":
                self.callback(indata, outdata, n, None, 0)
            elif self.kind == "input":
                self.callback(indata, n, None, 0)
            else:
                self.callback(outdata, n, None, 0)
            if self.kind != "input":
                self.output.append(outdata[:, 0].copy())
            i += 1
            t_next += period
            time.sleep(max(0.0, t_next - time.monotonic()))

    def abort(self):
        self.active = False
        if self._thread is not None:
            self._thread.join(2)

    close = abort


class FakeSD:
    """Devices: 0 'Built-in Microphone' (in, 44.1 kHz only), 1 'Built-in Output' (out, 24/48 kHz),
    2 'USB Headset' (in+out, 48 kHz only), 3 'USB Headset Monitor' (in, 48 kHz only)."""

    class PortAudioError(Exception):
        pass

    def __init__(self, clocked: bool = False, mic=None):
        def dev(name, n_in, n_out, rate):
            return dict(
                name=name, hostapi=0, max_input_channels=n_in, max_output_channels=n_out, default_samplerate=rate
            )

        self.devices = [
            dev("Built-in Microphone", 1, 0, 44100.0),
            dev("Built-in Output", 0, 2, 48000.0),
            dev("USB Headset", 1, 2, 48000.0),
            dev("USB Headset Monitor", 2, 0, 48000.0),
        ]
        self.rates = {0: {44100}, 1: {24000, 48000}, 2: {48000}, 3: {48000}}
        self.default = type("D", (), {"device": [0, 1]})()
        self.streams: list[FakeStream] = []
        self.clocked = clocked
        self.mic = mic or (lambda i, n: np.zeros(n, np.float32))

    def query_devices(self, device=None, kind=None):
        if device is None and kind is None:
            return [dict(d, index=i) for i, d in enumerate(self.devices)]
        if device is None:
            i = self.default.device[0 if kind == "input" else 1]
            return dict(self.devices[i], index=i)
        return dict(self.devices[device], index=device)

    def query_hostapis(self):
        return [{"name": "Fake Audio"}]

    def _check(self, device, samplerate, **kw):
        if samplerate not in self.rates[device]:
            raise self.PortAudioError("Invalid sample rate [PaErrorCode -9997]")

    check_input_settings = check_output_settings = _check

    def Stream(self, device, **kw):
        return FakeStream(self, "duplex", device, **kw)

    def InputStream(self, device, **kw):
        return FakeStream(self, "input", device, **kw)

    def OutputStream(self, device, **kw):
        return FakeStream(self, "output", device, **kw)
