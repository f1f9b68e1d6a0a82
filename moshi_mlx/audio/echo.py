"""Acoustic echo cancellation for the local (terminal) app.

Lets people talk to Moshi over laptop speakers: the microphone picks up what
Moshi says through the speakers, and without cancellation Moshi hears (and
answers) itself.  The heavy lifting is done by the WebRTC audio processing
module (AEC3 echo canceller + noise suppressor + high-pass filter) as shipped
in the ``livekit`` real-time SDK (``livekit.rtc.AudioProcessingModule``),
which has wheels for macOS arm64 and Linux.  This module only adapts it to
the app's audio format (24 kHz mono float32, 80 ms frames of 1920 samples).

Facts about ``livekit.rtc.AudioProcessingModule`` (checked on livekit 1.2.1):

* Audio is int16 (``rtc.AudioFrame``), processed in place.
* Every call must carry exactly 10 ms of audio: the native side builds a
  ``webrtc::StreamConfig(sample_rate, channels)`` and reads ``sample_rate/100``
  samples, silently ignoring any extra samples.  So an 80 ms frame is fed as
  8 chunks of 240 samples.
* 24 kHz is accepted directly (as are 8/16/32/44.1/48 kHz); the APM resamples
  internally, so no resampling is needed here.  Cancellation measured the same
  at 24 kHz as when resampling to 48 kHz.
* ``set_stream_delay_ms`` accepts 0..500 ms (otherwise raises RuntimeError);
  the value persists between calls.  It is only a hint: AEC3 estimates the
  echo delay itself, the hint mainly speeds up convergence (true 400 ms: 47 dB
  ERLE in the first 2 s with the hint, 24 dB without).  AEC3 finds echoes up
  to 400 ms but not 600 ms (~5 dB), so for ``delay_ms`` > 300 this class also
  holds the reference back in its own queue (see ``EchoCanceller``).
* The first AudioProcessingModule starts livekit's native FFI runtime (4 extra
  threads, ~65 ms once; ``import livekit.rtc`` takes ~0.2 s).  livekit refuses
  to be used in a child process after fork() if the parent used it already.
* The processed mic signal comes out ~15 ms later than it went in (366 samples
  at 24 kHz, measured; from AEC3 and the noise suppressor inside the APM).
  This class itself buffers nothing on the mic path: each ``process_near``
  call returns as many samples as it was given.

Calling pattern
---------------
Per 80 ms frame, call ``process_far(frame_sent_to_the_speaker)`` then
``process_near(mic_frame)``; ``process_near`` returns the cleaned mic frame.
All calls into the native module happen inside ``process_near``;
``process_far`` only appends to a locked queue, so the two may also be called
from two different threads (one audio thread each).  The far signal must reach
``process_far`` no later than its echo reaches ``process_near`` (i.e. the true
echo delay, as seen by this class, must be >= ~10 ms); the natural pattern of a
duplex stream callback (speaker block written at tick t, mic block read at tick
t) satisfies this, because what is written now is heard by the mic later.
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass
from typing import Deque

import numpy as np

from ..errors import MoshiError
from .frames import FRAME_SIZE, SAMPLE_RATE

__all__ = ["AecUnavailable", "EchoCanceller", "EchoReduction", "aec_available", "measure_reduction"]

_INSTALL_HINT = "pip install livekit, or pass --no-aec"

# set_stream_delay_ms accepts 0..500; AEC3's own delay search reliably finds
# echoes up to ~400 ms (measured).  Beyond _PREDELAY_ABOVE_MS, the reference is
# held back in our queue so that AEC3 only has to find _PREDELAY_RESIDUAL_MS.
_APM_MAX_DELAY_MS = 500
_PREDELAY_ABOVE_MS = 300
_PREDELAY_RESIDUAL_MS = 200
_FAR_ACTIVE_LEVEL = 8  # int16 peak above which the speaker counts as playing (about -72 dBFS)

# When the reduction means something. A mic that heard (nearly) nothing while Moshi spoke (an ALSA
# file device, a muted mic, headphones) has no echo to remove: dividing its energy by the near-zero
# energy after the noise suppressor once gave "116.1 dB removed". Below the mic floor nothing is
# reported; below the residual floor (a few int16 steps) only a lower bound is.
MIN_SPEAKER_S = 1.0  # Moshi must have played this long for a figure
MIC_FLOOR_DBFS = -60.0  # mic level (RMS) while Moshi played, below which there is no echo to measure
RESIDUAL_FLOOR_DBFS = -80.0  # cleaned-mic level (RMS) below which the figure is "more than ..."
MIN_REPORTED_DB = 1.0  # less than this is "nothing measurable removed", not a figure


class AecUnavailable(MoshiError, RuntimeError):
    """Raised when the WebRTC audio processing module (livekit) cannot be used."""


def _unavailable(e: BaseException) -> AecUnavailable:
    why = " ".join(f"{type(e).__name__}: {e}".split())  # one line
    return AecUnavailable(f"echo cancellation unavailable ({why}): {_INSTALL_HINT}")


def _load_rtc():
    try:
        from livekit import rtc  # optional dependency
    except Exception as e:  # ImportError, or OSError from the native library
        raise _unavailable(e) from None
    return rtc


def aec_available() -> bool:
    """True if ``livekit`` can be imported (does not load the native library)."""
    try:
        _load_rtc()
    except AecUnavailable:
        return False
    return True


@dataclass(frozen=True)
class EchoReduction:
    """What echo cancellation removed from the mic while the speaker played, as far as it is measurable."""

    db: float | None  # None: nothing to measure (see `reason`)
    at_least: bool = False  # the cleaned mic fell below RESIDUAL_FLOOR_DBFS: `db` is a lower bound
    reason: str = ""

    def describe(self) -> str:
        if self.db is None:
            return f"no echo to measure ({self.reason})"
        if self.db < MIN_REPORTED_DB:
            return "nothing measurable removed from the mic while Moshi was speaking (no echo heard)"
        more = "more than " if self.at_least else ""
        return f"{more}{self.db:.1f} dB removed from the mic while Moshi was speaking"


def _dbfs(mean_square: float) -> float:
    return 10.0 * math.log10(max(mean_square, 1e-20))


def measure_reduction(energy_in: float, energy_out: float, samples: int, sample_rate: int) -> EchoReduction:
    """The reduction from mic energies (sums of squares, full scale = 1.0) over `samples` of speaker activity."""
    if samples < MIN_SPEAKER_S * sample_rate:
        return EchoReduction(None, reason=f"Moshi played for less than {MIN_SPEAKER_S:g} s")
    level_in = _dbfs(energy_in / samples)
    if level_in < MIC_FLOOR_DBFS:
        return EchoReduction(None, reason=f"the mic heard nearly nothing while Moshi played ({level_in:.0f} dBFS)")
    level_out = _dbfs(energy_out / samples)
    if level_out < RESIDUAL_FLOOR_DBFS:
        return EchoReduction(level_in - RESIDUAL_FLOOR_DBFS, at_least=True)
    return EchoReduction(level_in - level_out)


class EchoCanceller:
    """WebRTC echo canceller + noise suppressor + high-pass filter for mono float32 audio.

    Args:
        sample_rate: rate of both streams, Hz; must be a multiple of 100 (24000 for Moshi).
        frame_size: nominal samples per ``process_near`` call (1920 = 80 ms at 24 kHz);
            any multiple of 10 ms is accepted by ``process_near``.
        delay_ms: expected delay between a far frame being passed to ``process_far``
            and its echo appearing in the frames passed to ``process_near`` (output
            latency + acoustic path + input latency; with far/near passed on the same
            80 ms tick, roughly one frame plus the device latencies).  Only a hint up
            to 300 ms; above that the reference is additionally delayed internally,
            so do not overstate it.
        noise_suppression, high_pass_filter, auto_gain_control: WebRTC APM stages.

    Raises:
        AecUnavailable: livekit is missing or its native library cannot be loaded.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        frame_size: int = FRAME_SIZE,
        delay_ms: int = 120,
        *,
        noise_suppression: bool = True,
        high_pass_filter: bool = True,
        auto_gain_control: bool = False,
    ) -> None:
        if sample_rate <= 0 or sample_rate % 100:
            raise ValueError(f"sample_rate must be a positive multiple of 100, got {sample_rate}")
        self.sample_rate = int(sample_rate)
        self.chunk = self.sample_rate // 100  # 10 ms, the APM's unit
        if frame_size <= 0 or frame_size % self.chunk:
            raise ValueError(f"frame_size must be a multiple of 10 ms ({self.chunk} samples)")
        self.frame_size = int(frame_size)
        delay_ms = int(delay_ms)
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        self.delay_ms = delay_ms
        if delay_ms > _PREDELAY_ABOVE_MS:
            self._predelay_chunks = (delay_ms - _PREDELAY_RESIDUAL_MS) // 10
        else:
            self._predelay_chunks = 0
        self._hint_ms = min(delay_ms - 10 * self._predelay_chunks, _APM_MAX_DELAY_MS)
        # How many far chunks may wait beyond the pre-delay before the oldest are
        # dropped (far called more often than near, e.g. near stalled): one second.
        self._max_backlog = self._predelay_chunks + 100

        self._rtc = _load_rtc()
        self._opts = dict(
            echo_cancellation=True,
            noise_suppression=noise_suppression,
            high_pass_filter=high_pass_filter,
            auto_gain_control=auto_gain_control,
        )
        self._lock = threading.Lock()  # guards the far queue and counters
        self._far: Deque[np.ndarray] = collections.deque()
        self._far_rest = np.zeros(0, np.int16)
        # Reused 10 ms int16 buffers wrapped by AudioFrames (processed in place).
        self._far_buf = bytearray(2 * self.chunk)
        self._near_buf = bytearray(2 * self.chunk)
        self._far_view = np.frombuffer(self._far_buf, np.int16)
        self._near_view = np.frombuffer(self._near_buf, np.int16)
        self._apm = None
        self.far_dropped_chunks = 0
        self.far_missing_chunks = 0
        self.reset()

    # -- lifecycle -------------------------------------------------------------------

    def reset(self) -> None:
        """Start over: new APM state, empty reference queue (e.g. between conversations).

        Call it (and ``close``) from the thread that calls ``process_near``, or
        while no audio is flowing."""
        rtc = self._rtc
        try:
            apm = rtc.AudioProcessingModule(**self._opts)
            apm.set_stream_delay_ms(self._hint_ms)
        except (ImportError, OSError) as e:  # native library fails on first use
            raise _unavailable(e) from None
        self._far_frame = rtc.AudioFrame(self._far_buf, self.sample_rate, 1, self.chunk)
        self._near_frame = rtc.AudioFrame(self._near_buf, self.sample_rate, 1, self.chunk)
        self._energy_in = self._energy_out = 0.0  # int16 units, only while the speaker plays
        self._far_active_samples = 0
        with self._lock:
            self._apm = apm
            self._far.clear()
            self._far_rest = np.zeros(0, np.int16)
            for _ in range(self._predelay_chunks):
                self._far.append(np.zeros(self.chunk, np.int16))

    def close(self) -> None:
        """Release the native APM (also happens on garbage collection)."""
        with self._lock:
            apm, self._apm = self._apm, None
        handle = getattr(apm, "_ffi_handle", None)
        if handle is not None and hasattr(handle, "dispose"):
            handle.dispose()

    def __enter__(self) -> "EchoCanceller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- audio -----------------------------------------------------------------------

    @staticmethod
    def _to_int16(pcm: np.ndarray) -> np.ndarray:
        x = np.asarray(pcm, dtype=np.float32)
        if x.ndim == 2 and x.shape[1] == 1:  # (n, 1): sounddevice callback layout
            x = x[:, 0]
        if x.ndim != 1:
            raise ValueError(f"expected mono audio of shape (n,) or (n, 1), got {x.shape}")
        return np.clip(np.rint(x * 32767.0), -32768, 32767).astype(np.int16)

    def process_far(self, speaker_pcm: np.ndarray) -> None:
        """Queue what was sent to the speaker (float32 in [-1, 1], any length)."""
        x = self._to_int16(speaker_pcm)
        with self._lock:
            if self._far_rest.size:
                x = np.concatenate([self._far_rest, x])
            n = x.size // self.chunk * self.chunk
            for i in range(0, n, self.chunk):
                self._far.append(x[i : i + self.chunk])
            self._far_rest = x[n:].copy()
            while len(self._far) > self._max_backlog:
                self._far.popleft()
                self.far_dropped_chunks += 1

    @property
    def reduction(self) -> EchoReduction:
        """Mic energy removed while the speaker was playing (see :func:`measure_reduction`).

        While only Moshi talks this is the echo return loss enhancement; the user's own speech
        over Moshi lowers it, so treat it as a session-level indication.
        """
        full_scale = 32768.0**2
        return measure_reduction(
            self._energy_in / full_scale, self._energy_out / full_scale, self._far_active_samples, self.sample_rate
        )

    @property
    def reduction_db(self) -> float | None:
        """`reduction` in dB, or None where there is nothing to measure (a lower bound if below the floor)."""
        return self.reduction.db

    def process_near(self, mic_pcm: np.ndarray) -> np.ndarray:
        """Return the cleaned microphone signal (float32, same length as the input).

        The length must be a multiple of 10 ms (240 samples at 24 kHz).  For each
        10 ms chunk, one queued far chunk (or silence if none is queued) is given to
        the APM as the render reference, then the mic chunk is processed.
        """
        x = self._to_int16(mic_pcm)
        if x.size % self.chunk:
            raise ValueError(
                f"mic frame of {x.size} samples is not a multiple of 10 ms ({self.chunk})"
            )
        apm = self._apm
        if apm is None:
            raise RuntimeError("EchoCanceller is closed")
        out = np.empty(x.size, np.float32)
        c = self.chunk
        apm.set_stream_delay_ms(self._hint_ms)
        for i in range(0, x.size, c):
            with self._lock:
                far = self._far.popleft() if self._far else None
                if far is None:
                    self.far_missing_chunks += 1
            if far is None:
                self._far_view[:] = 0
            else:
                self._far_view[:] = far
            apm.process_reverse_stream(self._far_frame)
            self._near_view[:] = x[i : i + c]
            far_active = far is not None and np.abs(far).max() > _FAR_ACTIVE_LEVEL
            if far_active:
                self._energy_in += float(np.square(self._near_view, dtype=np.float64).sum())
                self._far_active_samples += c
            apm.process_stream(self._near_frame)
            if far_active:
                self._energy_out += float(np.square(self._near_view, dtype=np.float64).sum())
            out[i : i + c] = self._near_view
        out *= 1.0 / 32768.0
        return out
