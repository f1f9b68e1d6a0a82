"""Sound devices (sounddevice / PortAudio) and resampling for the terminal app and file runs.

* :func:`list_devices` and :func:`find_device` pick devices by index or by (part of) their name and
  turn every failure into one-line :class:`AudioDeviceError` messages.
* :class:`DuplexAudio` opens the microphone and the speaker as mono float32 streams with 80 ms blocks.
  Its callbacks never wait: the mic callback hands complete 24 kHz frames to ``on_input`` (e.g.
  ``EngineRunner.push``), the speaker callback takes frames queued with :meth:`DuplexAudio.play` from
  a bounded buffer and plays silence (counted) when none is ready. A device that cannot run at 24 kHz
  is opened at a rate it supports, and both directions are resampled in the callbacks.
Resampling in the callbacks is soxr's (`frames.Resampler`); frames are cut by `frames.FrameChunker`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from ..errors import MoshiError, first_line
from .frames import FRAME_SIZE, SAMPLE_RATE, FrameChunker, Resampler

#: Rates tried, in order, when a device cannot run at 24 kHz (after its own default rate).
FALLBACK_RATES = (48_000, 44_100, 32_000, 96_000, 16_000, 88_200, 22_050)


class AudioDeviceError(MoshiError, RuntimeError):
    """A sound device problem (missing PortAudio, unknown or unsuitable device, stream failure): one line."""


class NoDefaultDevice(AudioDeviceError):
    """No device was named and there is no default one (typically: no sound card); front ends add what to do."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (libjack's "Cannot connect to server", ALSA probing chatter) meanwhile.

    Set MOSHI_MLX_DEBUG=1 to see that output.
    """
    if os.environ.get("MOSHI_MLX_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _sd():
    """Import sounddevice (PortAudio scans the devices then), turning a missing PortAudio into one line."""
    if "sounddevice" in sys.modules:
        return sys.modules["sounddevice"]
    try:
        with _quiet_stderr():
            import sounddevice
    except OSError as e:  # raised by sounddevice when libportaudio cannot be loaded
        raise AudioDeviceError(
            f"{first_line(e)}: install PortAudio "
            "(Debian/Ubuntu: apt install libportaudio2; macOS: brew install portaudio)"
        ) from None
    except ImportError as e:
        raise AudioDeviceError(f"sounddevice is not installed ({e}); pip install sounddevice") from None
    return sounddevice


def release_portaudio() -> None:
    """Terminate PortAudio now if sounddevice was loaded (it otherwise does so at interpreter exit).

    For entry points that leave with ``os._exit``: sound servers such as JACK keep a client that
    vanished without closing in their graph and stall on it later.
    """
    sd = sys.modules.get("sounddevice")
    terminate = getattr(sd, "_terminate", None)  # sounddevice's own atexit handler uses it
    if terminate is None:
        return
    try:
        while getattr(sd, "_initialized", 0) > 0:
            terminate()
    except Exception:
        pass


# ------------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------

_KINDS = {"input": "max_input_channels", "output": "max_output_channels"}


def _query(sd) -> list[dict]:
    try:
        return list(sd.query_devices())
    except Exception as e:
        raise AudioDeviceError(f"cannot list sound devices: {first_line(e)}") from None


def list_devices(if_none: str = "") -> str:
    """A readable table of the sound devices; ``>`` marks the default input, ``<`` the default output.

    With no device at all, one line, followed by ``if_none`` (the front end's advice on what to do instead).
    """
    sd = _sd()
    devices = _query(sd)
    if not devices:
        return "no sound devices found (PortAudio sees none)" + (f"; {if_none}" if if_none else "")
    try:
        hostapis = [h["name"] for h in sd.query_hostapis()]
    except Exception:
        hostapis = []
    default_in, default_out = (_default_index(sd, k) for k in ("input", "output"))
    lines = []
    for i, d in enumerate(devices):
        mark = (">" if i == default_in else " ") + ("<" if i == default_out else " ")
        api = hostapis[d["hostapi"]] if d["hostapi"] < len(hostapis) else "?"
        lines.append(
            f"{mark} {i:2d} {d['name']} ({api}; {d['max_input_channels']} in, {d['max_output_channels']} out; "
            f"{d['default_samplerate']:.0f} Hz)"
        )
    lines.append("  (> default input, < default output)")
    return "\n".join(lines)


def _default_index(sd, kind: str) -> int:
    try:
        dev = sd.default.device[0 if kind == "input" else 1]
        if dev is None or (isinstance(dev, int) and dev < 0):
            return sd.query_devices(kind=kind)["index"]
        return dev if isinstance(dev, int) else sd.query_devices(dev, kind=kind)["index"]
    except Exception:
        return -1


def find_device(spec: int | str | None, kind: str) -> int:
    """The index of the ``kind`` ("input" or "output") device chosen by index, (part of) a name, or default.

    Names match case-insensitively; an exact name wins over a partial one; a partial name that fits
    several devices is an error naming them.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'input' or 'output', got {kind!r}")
    sd = _sd()
    devices = _query(sd)
    chans = _KINDS[kind]
    flag = f"--{kind}-device"
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        idx = _default_index(sd, kind)
        if idx < 0 or idx >= len(devices) or devices[idx][chans] < 1:
            what = "microphone" if kind == "input" else "speaker"
            raise NoDefaultDevice(kind, f"no {what} found (no default {kind} device): pick one with {flag} (see --list-devices)")
        return idx
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().lstrip("-").isdigit()):
        idx = int(spec)
        if not 0 <= idx < len(devices):
            raise AudioDeviceError(f"{flag} {idx}: no such device (there are {len(devices)}; see --list-devices)")
        if devices[idx][chans] < 1:
            raise AudioDeviceError(f"{flag} {idx}: '{devices[idx]['name']}' has no {kind} channels")
        return idx
    want = spec.strip().lower()
    usable = [i for i, d in enumerate(devices) if d[chans] > 0]
    exact = [i for i in usable if devices[i]["name"].lower() == want]
    partial = exact or [i for i in usable if want in devices[i]["name"].lower()]
    if len(partial) == 1:
        return partial[0]
    if partial:
        names = ", ".join(f"{i} '{devices[i]['name']}'" for i in partial[:4])
        raise AudioDeviceError(f"{flag} {spec!r} matches several {kind} devices ({names}); use its index")
    if any(want in d["name"].lower() for d in devices):
        raise AudioDeviceError(f"{flag} {spec!r}: that device has no {kind} channels (see --list-devices)")
    raise AudioDeviceError(f"{flag} {spec!r}: no such {kind} device (see --list-devices)")


def pick_rate(device: int, kind: str) -> int:
    """24 kHz if the device takes it, else its default rate, else the first common rate it accepts."""
    sd = _sd()
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    info = sd.query_devices(device)
    candidates = [SAMPLE_RATE, int(info["default_samplerate"]), *FALLBACK_RATES]
    last_err = None
    for rate in dict.fromkeys(r for r in candidates if r > 0):
        try:
            check(device=device, samplerate=rate, channels=1, dtype="float32")
            return rate
        except Exception as e:  # PortAudioError / ValueError: "Invalid sample rate", ...
            last_err = e
    raise AudioDeviceError(
        f"{kind} device {device} '{info['name']}' accepts no usable mono float32 format ({first_line(last_err)})"
    )


# ------------------------------------------------------------------------------------------------
# Duplex streaming
# ------------------------------------------------------------------------------------------------


@dataclass
class AudioStats:
    mic_frames: int = 0  # 24 kHz frames handed to on_input
    played_frames: int = 0  # frames taken from the play buffer
    underruns: int = 0  # frames of silence played because no Moshi frame was ready (after the first one)
    overflows: int = 0  # queued Moshi frames discarded because the play buffer was full
    status_flags: int = 0  # callbacks that reported PortAudio over/underflow flags
    callbacks: int = 0


class EchoHook(Protocol):
    def process_far(self, speaker_pcm: np.ndarray) -> None: ...

    def process_near(self, mic_pcm: np.ndarray) -> np.ndarray: ...


class _FrameAssembler:
    """Device-rate blocks in, 24 kHz frames of FRAME_SIZE out."""

    def __init__(self, rate: int):
        self.resampler = Resampler(rate, SAMPLE_RATE)
        self.chunker = FrameChunker()

    def push(self, block: np.ndarray) -> list[np.ndarray]:
        return self.chunker.push(self.resampler.process(block))


class DuplexAudio:
    """Microphone in, speaker out, at 24 kHz mono float32 in 80 ms frames, never blocking in callbacks.

    on_input(frame): called from the audio thread with each 1920-sample 24 kHz mic frame; it must not
        block (``EngineRunner.push`` qualifies).
    echo_canceller: optional hook where the mic and its echo reference meet, e.g.
        :class:`moshi_mlx.audio.echo.EchoCanceller` (anything with ``process_far`` and ``process_near``).
        ``process_far(frame)`` gets every 24 kHz frame in the order it is sent to the speaker
        (silence included) and ``process_near(mic) -> mic`` every mic frame before ``on_input``. Both run
        in the audio callbacks; with one duplex stream a tick's speaker frame is given before that
        tick's mic frame (what is played now can only be heard later). They must be quick (a few ms).
    max_queued: play-buffer bound in frames; frames beyond it are dropped, oldest first (counted).

    With one device for both directions a single duplex PortAudio stream is used (mic and speaker
    blocks share one clock and one callback); otherwise two streams run side by side.
    """

    def __init__(
        self,
        on_input: Callable[[np.ndarray], None],
        input_device: int | str | None = None,
        output_device: int | str | None = None,
        max_queued: int = 8,
        echo_canceller: EchoHook | None = None,
        on_output: Callable[[np.ndarray], None] | None = None,
    ):
        self._sd = _sd()
        self.on_input = on_input
        self.on_output = on_output  # sees every 24 kHz frame as it goes to the speaker (recording)
        self.echo_canceller = echo_canceller
        self.input_device = find_device(input_device, "input")
        self.output_device = find_device(output_device, "output")
        self.input_rate = pick_rate(self.input_device, "input")
        self.output_rate = pick_rate(self.output_device, "output")
        self._queue: deque[np.ndarray] = deque(maxlen=max(1, max_queued))
        self._queue_lock = threading.Lock()
        self._mic = _FrameAssembler(self.input_rate)
        self._spk_resampler = Resampler(SAMPLE_RATE, self.output_rate)
        self._spk_buf = np.zeros(0, np.float32)  # device-rate samples waiting to be played
        self._silence = np.zeros(FRAME_SIZE, np.float32)
        self._started_playing = False
        self.stats = AudioStats()
        self.callback_error: BaseException | None = None
        self._streams: list = []

    # -- description ---------------------------------------------------------------------------
    def describe(self) -> str:
        parts = []
        for kind, dev, rate, how in (
            ("mic", self.input_device, self.input_rate, "to"),
            ("speaker", self.output_device, self.output_rate, "from"),
        ):
            name = self._sd.query_devices(dev)["name"]
            note = "" if rate == SAMPLE_RATE else f", resampled {how} 24 kHz"
            parts.append(f"{kind}: {dev} '{name}' ({rate} Hz{note})")
        return "; ".join(parts)

    # -- producer side (engine thread) ------------------------------------------------------------
    def play(self, pcm: np.ndarray) -> None:
        """Queue one 24 kHz frame for the speaker (never blocks; drops the oldest when full)."""
        frame = np.asarray(pcm, dtype=np.float32).reshape(-1)
        with self._queue_lock:
            if len(self._queue) == self._queue.maxlen:
                self.stats.overflows += 1
            self._queue.append(frame)

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    def clear(self) -> None:
        with self._queue_lock:
            self._queue.clear()

    # -- callbacks (audio thread) -------------------------------------------------------------------
    def _next_frame(self) -> np.ndarray:
        with self._queue_lock:  # held for a pop only; never contended for long
            frame = self._queue.popleft() if self._queue else None
        if frame is None:
            if self._started_playing:
                self.stats.underruns += 1
            frame = self._silence
        else:
            self._started_playing = True
            self.stats.played_frames += 1
        if self.echo_canceller is not None:
            self.echo_canceller.process_far(frame)
        if self.on_output is not None:
            self.on_output(frame)
        return frame

    def _fill_output(self, out: np.ndarray) -> None:
        n = out.shape[0]
        if self.output_rate == SAMPLE_RATE and n == FRAME_SIZE and not self._spk_buf.size:
            frame = self._next_frame()
            out[:, 0] = frame[:FRAME_SIZE] if frame.size >= FRAME_SIZE else np.pad(frame, (0, FRAME_SIZE - frame.size))
            return
        while self._spk_buf.size < n:
            frame = self._next_frame()
            self._spk_buf = np.concatenate([self._spk_buf, self._spk_resampler.process(frame)])
        out[:, 0] = self._spk_buf[:n]
        self._spk_buf = self._spk_buf[n:]

    def _take_input(self, indata: np.ndarray) -> None:
        for frame in self._mic.push(indata[:, 0]):
            if self.echo_canceller is not None:
                frame = self.echo_canceller.process_near(frame)
            self.stats.mic_frames += 1
            self.on_input(frame)

    def _guarded(self, fn, out_index: int | None):
        """A PortAudio callback around ``fn``; ``out_index``: position of ``outdata`` in the arguments."""

        def callback(*args):
            status = args[-1]
            self.stats.callbacks += 1
            if status:
                self.stats.status_flags += 1
            try:
                fn(*args[:-1])
            except Exception as e:  # never let an exception kill the stream silently
                if self.callback_error is None:
                    self.callback_error = e
                if out_index is not None:  # play silence rather than garbage
                    args[out_index].fill(0)

        return callback

    def _duplex_cb(self, indata, outdata, frames, time_info):
        self._fill_output(outdata)  # written first: the mic block of this tick can only hold older echoes
        self._take_input(indata)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "DuplexAudio":
        sd = self._sd
        in_block = round(FRAME_SIZE * self.input_rate / SAMPLE_RATE)
        out_block = round(FRAME_SIZE * self.output_rate / SAMPLE_RATE)
        common = dict(channels=1, dtype="float32", latency="low")
        try:
            if self.input_device == self.output_device and self.input_rate == self.output_rate:
                self._streams = [
                    sd.Stream(
                        device=(self.input_device, self.output_device), samplerate=self.input_rate,
                        blocksize=in_block, callback=self._guarded(self._duplex_cb, 1), **common,
                    )
                ]
            else:
                self._streams = [
                    sd.InputStream(
                        device=self.input_device, samplerate=self.input_rate, blocksize=in_block,
                        callback=self._guarded(lambda indata, frames, t: self._take_input(indata), None), **common,
                    ),
                    sd.OutputStream(
                        device=self.output_device, samplerate=self.output_rate, blocksize=out_block,
                        callback=self._guarded(lambda outdata, frames, t: self._fill_output(outdata), 0), **common,
                    ),
                ]
            for s in self._streams:
                s.start()
        except Exception as e:  # sd.PortAudioError, ValueError from sounddevice's checks
            self.close()
            raise AudioDeviceError(f"cannot open the sound devices: {first_line(e)}") from None
        return self

    def close(self) -> None:
        """Stop and close the streams at once (abort: queued device buffers are not drained)."""
        streams, self._streams = self._streams, []
        for s in streams:
            try:
                s.abort()
            except Exception:
                pass
            try:
                s.close()
            except Exception:
                pass

    @property
    def active(self) -> bool:
        return bool(self._streams) and all(s.active for s in self._streams)

    def __enter__(self) -> "DuplexAudio":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
