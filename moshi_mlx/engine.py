"""The conversation engine shared by the terminal app, the web server and the offline run.

`ConversationEngine` turns one 80 ms frame of user audio into one frame of Moshi's audio and
an optional transcript piece (Mimi encode -> LM step -> Mimi decode). It owns warm-up,
per-conversation reset and the text pieces.

`EngineRunner` runs an engine on worker threads for real-time front ends: audio callbacks
push frames without ever waiting on the model; encode, LM step and decode run as a three-stage
pipeline, so a frame's cost is the slowest stage rather than their sum; and when the model
falls behind, the oldest input frames are dropped so latency stays bounded.

A speech-to-text model (text only: `dep_q` 0, Kyutai's STT) runs through the same engine and runner as live
captions: encode and LM step only (no decode stage, no audio made), each result carrying the words the frame
completed (:class:`~moshi_mlx.transcribe.Word`, times in the input's seconds) and the semantic end-of-turn
heads' probabilities. The model's silence prefix is fed at reset, before any input is waiting; frames the
runner drops are counted into the words' clock; `flush()` feeds the audio delay of silence at the end.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .audio.frames import FRAME_RATE, FRAME_SIZE
from .errors import MoshiError
from .generate import LmGen, StepOutput
from .mlx_thread import MlxThread
from .models.cache import DEFAULT_KV_BITS
from .models.lm import Lm
from .persona import PersonaPrompt, PromptSnapshots, play_prompt, prompt_tokens, voice_codes
from .settings import EngineSettings, in_effect
from .tokenizer import TextTokenizer
from .transcribe import END_OF_TURN_HEAD, Transcriber, Word
from .voices import Voice, load_voice


class AudioCodec(Protocol):
    """What the engine needs from Mimi (see moshi_mlx.audio.mimi.Mimi)."""

    def encode_frame(self, pcm: np.ndarray) -> np.ndarray: ...

    def decode_frame(self, codes: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class FrameResult:
    """Moshi's output for one input frame."""

    frame: int  # index of the input frame this answers (0-based, per conversation)
    pcm: np.ndarray | None  # float32 [FRAME_SIZE]; silence while the codebook delays fill; None: text-only model
    text: str | None  # transcript piece, if Moshi "said" a word here (a text-only model: a piece of a caption)
    text_token: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    # A text-only (STT) model only: the words this frame completed, each extra head's probability that the
    # speaker paused (None: the model has no such heads) and whether an end of turn was detected at this frame.
    words: tuple[Word, ...] = ()
    pauses: tuple[float, ...] | None = None
    turn_end: bool = False
    heard_s: float | None = None  # seconds of input up to the end of this frame (dropped frames included)

    @property
    def end_of_turn(self) -> float | None:
        """The semantic end-of-turn probability (head 2, as Kyutai's Unmute reads it), if the model has it."""
        p = self.pauses
        return p[END_OF_TURN_HEAD] if p is not None and len(p) > END_OF_TURN_HEAD else None


class ConversationEngine:
    def __init__(
        self,
        lm: Lm,
        mimi: AudioCodec,
        tokenizer: TextTokenizer | None,
        settings: EngineSettings = EngineSettings(),
        voices_dir: Path | None = None,
    ) -> None:
        self.text_only = lm.config.text_only
        if self.text_only and tokenizer is None:  # before any thread or cache exists
            raise MoshiError("a speech-to-text model needs its tokenizer for captions (--tokenizer)")
        self.lm = lm
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.settings = settings
        self.mlx = MlxThread()
        # Captions are read greedily (settings.in_effect says what a text-only model runs); the extra heads
        # (semantic VAD) are computed at each step.
        run = in_effect(settings, self.text_only)
        self.gen = self.mlx.run(
            lambda: LmGen(lm, run.text, run.audio, run.seed, text_controls=run.text_controls,
                          text_seed=run.text_seed, audio_seed=run.audio_seed,
                          kv_bits=settings.kv_bits or DEFAULT_KV_BITS, context=settings.context,
                          condition=settings.condition, cfg_coef=settings.cfg_coef, extra_heads=self.text_only)
        )
        self._silence = np.zeros(FRAME_SIZE, dtype=np.float32)
        self.frames_in = 0
        self.transcriber: Transcriber | None = None  # a text-only model's words, made fresh per conversation
        # The persona prompt (text_prompt / voice): checked now (one line before anything runs), played at
        # each conversation's start, restored from a snapshot when it was played before.
        self.voices_dir = voices_dir
        self.snapshots = PromptSnapshots()
        self._voices: dict[str, Voice] = {}
        self._codes: dict[tuple, list[np.ndarray]] = {}  # the voice recording in use, Mimi-encoded once
        self.prompt: PersonaPrompt | None = None
        self.prompt_seconds = 0.0  # what the last conversation start spent on the prompt
        self.prompt_restored = False  # whether that start restored a snapshot
        try:
            self.prompt = self._prompt_for(settings)
            self._start_conversation()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the engine's model thread (the engine can still be used: it restarts on demand)."""
        self.mlx.close()

    # -- conversation lifecycle -------------------------------------------------
    def reset(self, settings: EngineSettings | None = None) -> None:
        """Start a fresh conversation (optionally with new sampling settings)."""
        if settings is not None and settings != self.settings:
            self.prompt = self._prompt_for(settings)  # a bad voice or prompt: one line, the old settings stay
            self.settings = settings
            run = in_effect(settings, self.text_only)  # captions stay greedy (see __init__)
            self.mlx.run(
                self.gen.configure, run.text, run.audio, run.seed, run.text_controls,
                run.text_seed, run.audio_seed, run.condition, run.cfg_coef,
            )
        s = in_effect(self.settings, self.text_only)
        self.mlx.run(self.gen.reset, s.seed, s.text_seed, s.audio_seed)
        self.mimi.reset()
        self.frames_in = 0
        self._start_conversation()

    def _prime(self) -> None:
        """A text-only model: a fresh transcript, its silence prefix fed now (while no input waits)."""
        self.transcriber = Transcriber(self.gen, self.mimi, self.tokenizer)
        self.mlx.run(self.transcriber.prime)

    def _prompt_for(self, settings: EngineSettings) -> PersonaPrompt | None:
        """The persona prompt `settings` ask for, checked against the model (None: no prompt)."""
        if not settings.has_prompt:
            return None
        voice = None
        if settings.voice and settings.voice.strip():
            spec = settings.voice.strip()
            voice = self._voices.get(spec) or load_voice(spec, self.voices_dir)
            self._voices = {spec: voice}  # the voice in use stays loaded; another one replaces it
        encode = self.tokenizer.encode if self.tokenizer is not None else None
        if settings.text_prompt and settings.text_prompt.strip() and encode is None:
            raise MoshiError("--text-prompt needs the model's text tokenizer")
        prompt = PersonaPrompt(voice, prompt_tokens(encode, settings.text_prompt) if encode else ())
        prompt.check(self.lm.config, self.gen.window)
        return prompt

    def _start_conversation(self) -> None:
        """Prime a text-only model; else play the persona prompt on the fresh LmGen, or restore what playing
        it left last time."""
        if self.text_only:
            self._prime()
            return
        prompt = self.prompt
        if prompt is None:
            return
        start = time.perf_counter()
        gen = self.gen
        key = (prompt.key, gen.rows, repr(gen.condition), gen.cfg_coef)
        snap = self.snapshots.get(key)
        if snap is not None:
            self.mlx.run(gen.restore, snap)
        else:
            codes = None
            voice = prompt.voice
            if voice is not None and not voice.is_preset:  # encoded here, off the model's thread; kept for the
                codes = self._codes.get(voice.key)  # next role text with the same voice
                if codes is None:
                    codes = voice_codes(voice.pcm, self.mimi.encode_frame)
                    self._codes = {voice.key: codes}
                    self.mimi.reset()  # as NVIDIA: the voice's encoding leaves nothing in Mimi for the conversation
            self.mlx.run(play_prompt, gen, prompt, None, True, codes)
            self.snapshots.put(key, self.mlx.run(gen.snapshot))
        self.prompt_restored = snap is not None
        self.prompt_seconds = time.perf_counter() - start

    def warmup(self, frames: int = 4) -> float:
        """Run a few frames of silence through everything (allocations, compiled samplers), then reset.

        Returns the seconds it took.
        """
        start = time.perf_counter()
        for _ in range(max(frames, self.lm.config.max_delay + 2)):
            self.process(self._silence)
        self.reset()
        return time.perf_counter() - start

    # -- the three stages, usable separately by a pipeline --------------------------
    def encode(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.shape[0] != FRAME_SIZE:
            raise ValueError(f"expected a frame of {FRAME_SIZE} samples, got {pcm.shape[0]}")
        # Mimi runs as many codebooks as the larger stream needs; the user's stream takes its own share.
        return self.mimi.encode_frame(pcm)[: self.lm.config.user_codebooks]

    def step(self, codes: np.ndarray) -> StepOutput | None:
        self.frames_in += 1
        return self.mlx.run(self.gen.step, codes)

    def decode(self, out: StepOutput | None) -> tuple[np.ndarray, str | None]:
        if out is None:
            return self._silence.copy(), None
        pcm = self.mimi.decode_frame(out.audio_codes)
        text = self.tokenizer.piece(out.text_token) if self.tokenizer is not None else None
        return pcm, text

    def process(self, pcm: np.ndarray) -> FrameResult:
        """One frame through all three stages, synchronously (a text-only model: encode and caption)."""
        if self.text_only:
            t0 = time.perf_counter()
            codes = self.encode(pcm)
            encode_ms = (time.perf_counter() - t0) * 1e3
            result = self.caption(codes)
            result.timings_ms["encode"] = encode_ms
            return result
        frame = self.frames_in
        t0 = time.perf_counter()
        codes = self.encode(pcm)
        t1 = time.perf_counter()
        out = self.step(codes)
        t2 = time.perf_counter()
        audio, text = self.decode(out)
        t3 = time.perf_counter()
        timings = {"encode": (t1 - t0) * 1e3, "lm": (t2 - t1) * 1e3, "decode": (t3 - t2) * 1e3}
        return FrameResult(frame, audio, text, out.text_token if out else None, timings)

    # -- a text-only model: captions --------------------------------------------------------------
    def caption(self, codes: np.ndarray, skipped: int = 0) -> FrameResult:
        """A text-only model's step on one encoded frame (after `skipped` dropped ones): words, VAD, no audio."""
        tr = self.transcriber
        if tr is None:
            raise MoshiError("captions need a speech-to-text model; this one answers with audio")
        frame = self.frames_in
        self.frames_in += 1

        def step() -> tuple[list[Word], int]:
            tr.skip(skipped)
            before = len(tr.turn_ends)
            return tr.feed_codes(codes), len(tr.turn_ends) - before

        t0 = time.perf_counter()
        words, turns = self.mlx.run(step)
        token = tr.last_token
        text = self.tokenizer.piece(token) if token is not None and self.tokenizer is not None else None
        return FrameResult(frame, None, text, token, {"lm": (time.perf_counter() - t0) * 1e3}, tuple(words),
                           tr.pause_probabilities, turns > 0, tr.frames / FRAME_RATE)

    def flush(self) -> list[Word]:
        """A text-only model, once its input has ended (runner stopped): the audio delay of silence is fed so
        the last words come out; returns them. The next conversation starts with `reset()`."""
        if self.transcriber is None:
            return []
        return list(self.mlx.run(self.transcriber.finish))


@dataclass
class RunnerStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0  # input frames skipped because the model was behind
    last_latency_ms: float = 0.0  # input frame pushed -> its output ready
    recent_step_ms: deque = field(default_factory=lambda: deque(maxlen=25))

    @property
    def behind(self) -> bool:
        """Latency well past what the queues allow when keeping up: the model is slower than real time."""
        return self.last_latency_ms > 400.0


_STOP = object()


class EngineRunner:
    """Real-time wrapper: push 80 ms frames from any thread, receive FrameResults via a callback.

    `max_pending` bounds the input frames waiting for the encoder; beyond it the oldest are
    dropped (and counted) so the delay between speaking and hearing Moshi cannot grow.
    """

    def __init__(
        self,
        engine: ConversationEngine,
        on_result: Callable[[FrameResult], None],
        max_pending: int = 2,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.on_result = on_result
        self.on_error = on_error
        self.stats = RunnerStats()
        self._inbox: deque[tuple[np.ndarray, float]] = deque()
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._have_input = threading.Condition(self._lock)
        # Small queues between stages: backpressure reaches the inbox, where frames are dropped.
        self._to_lm: queue.Queue = queue.Queue(maxsize=1)
        # The encoder takes a frame from the inbox only when the LM queue has room, so waiting
        # frames wait in the inbox, where the oldest can still be dropped.
        self._lm_slot = threading.Semaphore(1)
        self._to_decode: queue.Queue = queue.Queue(maxsize=1)
        self._running = False
        self._threads: list[threading.Thread] = []
        self._lm_done: Future | None = None
        self._dropped_seen = 0  # dropped input frames already told to a text-only engine
        self.error: BaseException | None = None

    def start(self) -> "EngineRunner":
        self._running = True
        stages = [(self._encode_loop, "encode")]
        if not self.engine.text_only:  # a text-only model has no audio to decode: its results leave the LM stage
            stages.append((self._decode_loop, "decode"))
        for target, name in stages:
            thread = threading.Thread(target=self._guard(target), name=f"moshi-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._lm_done = self.engine.mlx.submit(self._guard(self._lm_loop))
        return self

    def push(self, pcm: np.ndarray) -> None:
        """Never blocks: safe to call from an audio callback."""
        now = time.perf_counter()
        with self._lock:
            self.stats.frames_in += 1
            self._inbox.append((np.array(pcm, dtype=np.float32, copy=True).reshape(-1), now))
            while len(self._inbox) > self._max_pending:
                self._inbox.popleft()
                self.stats.dropped += 1
            self._have_input.notify()

    def stop(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._running = False
            self._have_input.notify_all()
        for q in (self._to_lm, self._to_decode):
            try:
                q.put_nowait(_STOP)
            except queue.Full:
                pass
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        if self._lm_done is not None:
            try:
                self._lm_done.result(max(0.0, deadline - time.monotonic()))
            except Exception:  # a timeout here; worker errors were already reported
                pass

    def __enter__(self) -> "EngineRunner":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        lm_running = self._lm_done is not None and not self._lm_done.done()
        return self._running and lm_running and all(t.is_alive() for t in self._threads)

    # -- stages -------------------------------------------------------------------
    def _guard(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except BaseException as e:  # surface worker failures instead of going silent
                self.error = e
                with self._lock:
                    self._running = False
                    self._have_input.notify_all()
                if self.on_error is not None:
                    self.on_error(e)

        return run

    def _put(self, q: queue.Queue, item: object) -> bool:
        while self._running:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue) -> object:
        while self._running:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _STOP

    def _encode_loop(self) -> None:
        while True:
            while not self._lm_slot.acquire(timeout=0.1):
                if not self._running:
                    return
            with self._lock:
                while self._running and not self._inbox:
                    self._have_input.wait(0.1)
                if not self._running:
                    return
                pcm, pushed_at = self._inbox.popleft()
                dropped = self.stats.dropped  # all dropped frames so far came before this one
            t0 = time.perf_counter()
            codes = self.engine.encode(pcm)
            if not self._put(self._to_lm, (codes, pushed_at, (time.perf_counter() - t0) * 1e3, dropped)):
                return

    def _lm_loop(self) -> None:  # runs on the engine's MLX thread
        while True:
            item = self._get(self._to_lm)
            if item is _STOP:
                return
            self._lm_slot.release()
            codes, pushed_at, encode_ms, dropped = item
            if self.engine.text_only:
                self._caption(codes, pushed_at, encode_ms, dropped)
                continue
            frame = self.engine.frames_in
            t0 = time.perf_counter()
            out = self.engine.step(codes)
            lm_ms = (time.perf_counter() - t0) * 1e3
            self.stats.recent_step_ms.append(lm_ms)
            if not self._put(self._to_decode, (frame, out, pushed_at, {"encode": encode_ms, "lm": lm_ms})):
                return

    def _caption(self, codes: np.ndarray, pushed_at: float, encode_ms: float, dropped: int) -> None:
        """A text-only model's LM stage, which is also its last: the result goes out from here."""
        result = self.engine.caption(codes, skipped=dropped - self._dropped_seen)
        self._dropped_seen = dropped
        result.timings_ms["encode"] = encode_ms
        self.stats.recent_step_ms.append(result.timings_ms["lm"])
        self.stats.frames_out += 1
        self.stats.last_latency_ms = (time.perf_counter() - pushed_at) * 1e3
        self.on_result(result)

    def _decode_loop(self) -> None:
        while True:
            item = self._get(self._to_decode)
            if item is _STOP:
                return
            frame, out, pushed_at, timings = item
            t0 = time.perf_counter()
            pcm, text = self.engine.decode(out)
            timings["decode"] = (time.perf_counter() - t0) * 1e3
            self.stats.frames_out += 1
            self.stats.last_latency_ms = (time.perf_counter() - pushed_at) * 1e3
            self.on_result(FrameResult(frame, pcm, text, out.text_token if out else None, timings))
