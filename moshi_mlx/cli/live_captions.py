"""Live captions of the microphone in the terminal: ``python -m moshi_mlx.local --hf-repo kyutai/stt-1b-en_fr-mlx``.

A speech-to-text model (text only) runs in the same :class:`~moshi_mlx.engine.EngineRunner` as Moshi (encode and
LM step on worker threads, the oldest frames dropped when it falls behind); only the microphone is opened. Each
word goes to stdout once complete, as ``start end word`` (seconds from the start of listening, the lines
``run_inference`` prints for a file); the status line shows the semantic end-of-turn probability (head 2, as
Kyutai's Unmute reads it) with the lag, and an end of turn is said on stderr. At the end the model is fed its
audio delay of silence, so the last words come out. ``--record DIR`` keeps the microphone and the timed transcript
with the VAD's probabilities (:mod:`moshi_mlx.caption_recording`).
"""

from __future__ import annotations

import argparse
import queue
import time
from collections import deque
from typing import Any

import numpy as np

from ..audio.device_choice import AudioDeviceError
from ..audio.frames import FRAME_S, SAMPLE_RATE
from ..captions import word_line
from ..clips import DEMO_SIGNAL_SECONDS, demo_signal
from ..engine import ConversationEngine, EngineRunner, FrameResult
from ..errors import UsageError, first_line
from ..model_files.assets import STT_DEMO
from ..transcribe import END_OF_TURN_HEAD, END_OF_TURN_THRESHOLD, Word, frames_of
from .terminal import TerminalSession, log, make_recorder, save_recording

#: Cells of the end-of-turn meter on the status line.
METER_CELLS = 10
LISTENING = "listening: live captions of your microphone (Ctrl-C to quit)"


def end_of_turn_meter(p: float | None) -> str:
    """The status line's VAD part, e.g. ``end of turn 0.62 ######---- |``; empty for a model without the heads."""
    if p is None:
        return ""
    full = min(METER_CELLS, max(0, round(p * METER_CELLS)))
    mark = "!" if p > END_OF_TURN_THRESHOLD else " "
    return f"end of turn {p:.2f} {'#' * full}{'-' * (METER_CELLS - full)}{mark}| "


def check_caption_args(args: argparse.Namespace) -> None:
    """Flags that make no sense without a speaker: one line, before the devices open or the model loads."""
    if args.output_device is not None:
        raise UsageError("--output-device: a speech-to-text model plays nothing (live captions open the microphone "
                         "only)")


class LocalCaptions:
    """A far end for :class:`TerminalSession`: an STT model on this machine, captioning the microphone."""

    def __init__(self) -> None:
        self.runner: EngineRunner | None = None
        self.engine: ConversationEngine | None = None
        self.session: TerminalSession | None = None
        self.description = "?"
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.words: list[Word] = []
        self.turn_ends: list[float] = []
        self._latencies: deque[float] = deque(maxlen=100_000)
        self._failure: list[BaseException] = []
        self._end_of_turn: float | None = None

    @property
    def listening(self) -> bool:
        return self.runner is not None

    reached = listening

    def push(self, frame: np.ndarray) -> None:  # PortAudio's thread
        self.runner.push(frame)

    def start(self, engine: ConversationEngine, description: str, session: TerminalSession, max_pending: int) -> None:
        def on_result(res: FrameResult) -> None:  # the engine's LM thread: hand over, never wait
            self._latencies.append(self.runner.stats.last_latency_ms)
            self.results.put(res)

        self.engine, self.description, self.session = engine, description, session
        self.runner = EngineRunner(engine, on_result, max_pending=max_pending, on_error=self._failure.append)

    # -- the main thread ------------------------------------------------------------------------------
    def _word(self, word: Word) -> None:
        self.words.append(word)
        self.session.display.write_line(word_line(word))
        if self.session.recorder is not None:
            self.session.recorder.add_word(word)

    def _show(self, res: FrameResult) -> None:
        for word in res.words:
            self._word(word)
        recorder = self.session.recorder
        if res.pauses is not None:
            self._end_of_turn = res.end_of_turn
            if recorder is not None:
                recorder.add_vad(res.heard_s, res.pauses)
        if res.turn_end:
            self.turn_ends.append(res.heard_s)
            self.session.message(f"end of turn at {res.heard_s:.2f} s (head {END_OF_TURN_HEAD} above "
                                 f"{END_OF_TURN_THRESHOLD})")
            if recorder is not None:
                recorder.add_turn_end(res.heard_s)

    def converse(self, session: TerminalSession) -> None:
        """Until Ctrl-C or a failure: the words as they come, the end-of-turn meter and lag line."""
        self.runner.start()
        session.start_listening(LISTENING)
        while True:
            try:
                self._show(self.results.get(timeout=0.1))
                while True:
                    self._show(self.results.get_nowait())
            except queue.Empty:
                pass
            if self._failure or self.runner.error is not None:
                raise self._failure[0] if self._failure else self.runner.error
            session.check_devices()
            st = self.runner.stats
            session.show_lag(st.last_latency_ms, st.dropped, self._drop_warning, end_of_turn_meter(self._end_of_turn))

    @staticmethod
    def _drop_warning(dropped: int, lag_ms: float) -> str:
        return (f"the model is behind real time: skipped {dropped} of your frames so far ({dropped * FRAME_S:.1f} s "
                f"of audio, not captioned); lag {lag_ms:.0f} ms")

    def close(self) -> None:
        """Stop the runner, then flush the model's audio delay so the last words come out."""
        if self.runner is not None:
            self.runner.stop(timeout=1.0)
            try:
                while True:
                    self._show(self.results.get_nowait())
            except queue.Empty:
                pass
            if self.runner.error is None and self.engine is not None:
                for word in self.engine.flush():
                    self._word(word)
        if self.engine is not None:
            self.engine.close()

    def counts(self) -> str:
        st = self.runner.stats
        return (f"{st.frames_in} frames in, {st.frames_out} captioned, {st.dropped} dropped "
                f"({st.dropped * FRAME_S:.1f} s), {len(self.words)} words, {len(self.turn_ends)} ends of turn")

    def latencies(self) -> list[float]:
        return list(self._latencies)

    def recording_info(self) -> dict[str, Any]:
        config = self.engine.lm.config if self.engine is not None else None
        stt = config.stt if config is not None else None
        info: dict[str, Any] = {"model": self.description}
        if stt is not None:
            info["stt_config"] = {"audio_delay_seconds": stt.audio_delay_seconds,
                                  "audio_silence_prefix_seconds": stt.audio_silence_prefix_seconds}
        return info


def caption(args: argparse.Namespace, resolved: Any) -> int:
    """`local` with a speech-to-text model: the microphone's live captions until Ctrl-C."""
    from .flags import load_from_args, settings_from_args

    check_caption_args(args)
    far = LocalCaptions()
    try:
        session = TerminalSession(args, far, no_sound_hint=None, playback=False)
    except AudioDeviceError as e:
        if args.demo == STT_DEMO and args.input_device is None:  # as `--demo` does for Moshi: a file instead
            return offline_demo(args, e)
        raise
    t0 = time.perf_counter()
    assets = load_from_args(args, log=log, resolved=resolved)
    engine = assets.engine(settings_from_args(args, assets.lm.config, log))
    load_s = time.perf_counter() - t0
    warm_s = engine.warmup()
    log(f"ready in {load_s + warm_s:.1f} s (load {load_s:.1f} s, warm-up {warm_s:.1f} s): {assets.description} "
        f"(speech to text: captions only)")
    far.start(engine, assets.description, session, max_pending=args.max_lag_frames)
    session.begin()
    return session.run(lambda: far.converse(session), summary_on_error=False)


def offline_demo(args: argparse.Namespace, device_error: BaseException) -> int:
    """`--demo-stt` on a machine with no usable microphone: the same engine captions the demos' test signal, the
    words on stdout as live captions print them (``--record DIR`` keeps the signal and the timed transcript)."""
    from .flags import load_from_args, settings_from_args

    log(f"no usable sound device ({first_line(device_error)})")
    recorder = make_recorder(args.record, captions=True)  # its folder checked before the load
    log(f"running the speech-to-text demo offline instead: {DEMO_SIGNAL_SECONDS:.0f} s of test signal in, captions "
        "out (DEMO: random weights, so the words are made up)")
    assets = load_from_args(args, log=log)
    engine = assets.engine(settings_from_args(args, assets.lm.config, log))
    signal = demo_signal()
    words: list[Word] = []
    turn_ends = 0

    def show(new: Any) -> None:
        for word in new:
            words.append(word)
            print(word_line(word), flush=True)
            if recorder is not None:
                recorder.add_word(word)

    try:
        for frame in frames_of([signal]):
            res = engine.process(frame)
            if recorder is not None:
                recorder.add_user(frame)
                if res.pauses is not None:
                    recorder.add_vad(res.heard_s, res.pauses)
                if res.turn_end:
                    recorder.add_turn_end(res.heard_s)
            turn_ends += res.turn_end
            show(res.words)
        show(engine.flush())
    finally:
        engine.close()
    if recorder is not None:
        save_recording(recorder, {"model": assets.description, "input": "the demo's test signal"})
    log(f"DEMO done: {len(words)} made-up words and {turn_ends} ends of turn from {signal.size / SAMPLE_RATE:.1f} s "
        "of test signal (a real model: --hf-repo kyutai/stt-1b-en_fr-mlx)")
    return 0
