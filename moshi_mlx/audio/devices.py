"""Microphone in, speaker out: :class:`DuplexAudio`, the terminal apps' sound streams (sounddevice / PortAudio).

It opens the devices chosen by :mod:`moshi_mlx.audio.device_choice` as mono float32 streams with 80 ms blocks.
Its callbacks never wait: the mic callback hands complete 24 kHz frames to ``on_input`` (e.g.
``EngineRunner.push``), the speaker callback takes frames queued with :meth:`DuplexAudio.play` from a
bounded buffer and plays silence (counted) when none is ready. A device that cannot run at 24 kHz is
opened at a rate it supports, and both directions are resampled in the callbacks (soxr's, through
`frames.Resampler`); frames are cut by `frames.FrameChunker`. (Audio files are resampled elsewhere:
`audio/files.py`.)
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from ..errors import first_line
from . import device_choice
from .device_choice import AudioDeviceError, find_device, pick_rate
from .frames import FRAME_SIZE, SAMPLE_RATE, FrameChunker, Resampler
from .silence import SilentMicCheck, microphone_refused


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
    playback: False opens the microphone alone (live captions: nothing to play, no speaker stream).

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
        playback: bool = True,
    ):
        self._sd = device_choice.sounddevice_module()  # looked up now: tests put a fake there
        self.on_input = on_input
        self.on_output = on_output  # sees every 24 kHz frame as it goes to the speaker (recording)
        self.echo_canceller = echo_canceller
        self.playback = playback
        self.input_device = find_device(input_device, "input")
        self.output_device = find_device(output_device, "output") if playback else None
        self.input_rate = pick_rate(self.input_device, "input")
        self.output_rate = pick_rate(self.output_device, "output") if playback else SAMPLE_RATE
        self._queue: deque[np.ndarray] = deque(maxlen=max(1, max_queued))
        self._queue_lock = threading.Lock()
        self._mic = _FrameAssembler(self.input_rate)
        self.silence = SilentMicCheck(self.input_rate)  # the raw input, before resampling and echo cancelling
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
        sides = [("mic", self.input_device, self.input_rate, "to")]
        if self.playback:
            sides.append(("speaker", self.output_device, self.output_rate, "from"))
        for kind, dev, rate, how in sides:
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
        self.silence.feed(indata[:, 0])
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
            if not self.playback:
                self._streams = [
                    sd.InputStream(
                        device=self.input_device, samplerate=self.input_rate, blocksize=in_block,
                        callback=self._guarded(lambda indata, frames, t: self._take_input(indata), None), **common,
                    )
                ]
            elif self.input_device == self.output_device and self.input_rate == self.output_rate:
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
            refused = microphone_refused(e)
            if refused is not None:
                raise AudioDeviceError(refused) from None
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
