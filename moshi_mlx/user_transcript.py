"""The user's side written down: a speech-to-text model on the microphone, beside Moshi (``--transcribe-user``).

:class:`UserTranscriber` runs a :class:`~moshi_mlx.transcribe.Transcriber` on its own worker thread with its own
MLX stream (:class:`~moshi_mlx.mlx_thread.MlxThread`), so the audio callbacks that hand it frames never wait:
:meth:`UserTranscriber.push` only queues a copy. Frames the model cannot keep up with are counted, not queued
without end (at most :data:`MAX_BEHIND_S` of audio waits); the words after a dropped frame are moved on by
it, so their times stay those of the session. Words come out through ``on_words`` on the worker
thread, with times in seconds from the first frame pushed.

The STT model needs its own Mimi: Kyutai's STT models read 32 codebooks, Moshi's Mimi encodes 8 (16 for Hibiki 2B),
and a codec's codebook count is fixed when it is opened.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from .audio.frames import FRAME_RATE
from .generate import LmGen
from .mlx_thread import MlxThread
from .settings import GREEDY
from .transcribe import FrameEncoder, PieceSource, Transcriber, Word

#: Audio allowed to wait for the STT model before frames are dropped (seconds).
MAX_BEHIND_S = 2.0


class UserTranscriber:
    """Frames of the user's microphone in (any thread, never waits), timed words out (on its worker thread).

    `lm` is a text-only STT model (`dep_q` 0 with an `stt_config`; :class:`~moshi_mlx.transcribe.TranscribeError`
    otherwise), `encoder` its own Mimi with the model's codebook count. Greedy text, as Kyutai's STT configs run it.
    """

    def __init__(
        self, lm, encoder: FrameEncoder, tokenizer: PieceSource, on_words: Callable[[list[Word]], None],
        kv_bits: int = 16, name: str = "stt-user", on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._on_words = on_words
        self._on_error = on_error  # told once, on the worker, when the model fails (then frames are ignored)
        self._worker = MlxThread(name)
        # Made on the worker: MLX arrays and caches belong to the stream (thread) that creates them. The codec is
        # reset first: a web server's STT Mimi serves one conversation after another.
        def make() -> Transcriber:
            reset = getattr(encoder, "reset_encoder", None) or getattr(encoder, "reset", None)
            if reset is not None:
                reset()
            return Transcriber(LmGen(lm, GREEDY, GREEDY, kv_bits=kv_bits), encoder, tokenizer)

        self.transcriber: Transcriber = self._worker.run(make)
        self._lock = threading.Lock()
        self._waiting = 0
        self._max_waiting = max(1, round(MAX_BEHIND_S * FRAME_RATE))
        self._closed = False
        self._abandoned = False
        self.frames_in = 0
        self.dropped = 0
        self.error: BaseException | None = None
        self.step_seconds: deque[float] = deque(maxlen=10_000)  # the worker's time per frame (the benchmark and the summary)

    def push(self, pcm: np.ndarray) -> None:
        """One 80 ms frame (24 kHz mono float32); returns at once. A frame that finds the model
        :data:`MAX_BEHIND_S` behind is dropped (counted; the words after it keep the session's times)."""
        with self._lock:
            if self._closed or self.error is not None:
                return
            self.frames_in += 1
            if self._waiting >= self._max_waiting:
                self.dropped += 1
                return
            self._waiting += 1
            skipped = self.dropped
        self._worker.submit(self._step, np.array(pcm, np.float32, copy=True).reshape(-1), skipped)

    def _step(self, frame: np.ndarray, skipped: int) -> None:
        start = time.perf_counter()
        try:
            if self.error is None and not self._abandoned:  # close(flush=False): frames still queued are let go
                self._emit(self.transcriber.feed(frame), skipped)
        except BaseException as e:  # kept for the owner to raise on its own thread
            self.error = e
            if self._on_error is not None:
                self._on_error(e)
        finally:
            with self._lock:
                self._waiting -= 1
            self.step_seconds.append(time.perf_counter() - start)

    def _emit(self, words: list[Word], skipped: int) -> None:
        """Words in the session's time: the model never heard the `skipped` frames dropped before them."""
        if skipped:
            shift = skipped / FRAME_RATE
            words = [Word(w.text, w.start + shift, w.end + shift) for w in words]
        if words:
            self._on_words(words)

    @property
    def waiting(self) -> int:
        """Frames queued for the worker now."""
        with self._lock:
            return self._waiting

    def close(self, flush: bool = True, timeout: float = 10.0) -> None:
        """Stop taking frames; with `flush`, the frames still queued and then the model's audio delay of silence
        go through it so the last words come out (through `on_words`), waited for at most `timeout` seconds;
        without, queued frames are let go. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._abandoned = not flush
        if flush and self.error is None and self.transcriber.frames:
            done = self._worker.submit(self._finish)
            try:
                done.result(timeout=timeout)
            except Exception:  # a slow or failed flush must not hold the session's close
                pass
        self._worker.close()

    def _finish(self) -> None:
        self._emit(self.transcriber.finish(), self.dropped)
