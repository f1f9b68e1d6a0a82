"""What the terminal front ends share (``moshi_mlx.local`` and ``moshi_mlx.client``).

:class:`TerminalSession`: the sound devices (with echo cancellation and ``--record``) on one side, a
:class:`FarEnd` on the other (the local model, or a server), with the live transcript and lag line
(:class:`Display`), drop warnings and the closing summary. Also the audio and ``--record`` flags,
Ctrl-C / SIGTERM handling and the quick exit once everything is closed.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from ..audio.device_choice import (
    AudioDeviceError,
    NoDefaultDevice,
    list_devices,
    release_portaudio,
)
from ..audio.devices import DuplexAudio
from ..audio.frames import FRAME_S
from ..audio.silence import silent_microphone_line
from ..errors import first_line
from ..outputs import OutputError, probe_writable
from . import shell
from .display import Display, lag_status
from .flags import integer

if TYPE_CHECKING:
    from ..audio.recording import ConversationRecorder
    from ..caption_recording import CaptionRecorder


log = shell.say  # a line for the user on stderr


def add_audio_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Device, lag and echo-cancellation flags; returns the group so callers can add their own."""
    from .flags import add_lag_arg

    g = parser.add_argument_group("audio")
    g.add_argument("--list-devices", action="store_true", help="list the sound devices and exit")
    g.add_argument("--input-device", default=None, metavar="DEV", help="microphone: index or part of its name")
    g.add_argument("--output-device", default=None, metavar="DEV", help="speaker: index or part of its name")
    add_lag_arg(g)
    g.add_argument(
        "--no-aec", action="store_true",
        help="turn off echo cancellation (on by default so Moshi does not hear itself through the speakers)",
    )
    g.add_argument(
        "--aec-delay-ms", type=integer(0, 2000), default=120, metavar="MS",
        help="expected speaker-to-mic delay, a starting hint for the echo canceller (default 120)",
    )
    return g


def add_record_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--record", metavar="DIR", default=None,
        help="record the conversation into DIR as it goes (a crash loses at most the last second; the next "
        "--record DIR finishes such a recording): stereo WAV (you left, Moshi right), mixed mono WAV, transcript "
        ".txt and .json; never overwrites a file",
    )


def make_recorder(directory: str | None, captions: bool = False) -> ConversationRecorder | CaptionRecorder | None:
    """A recorder for --record DIR, after checking DIR can be written (before any slow loading or connecting);
    `captions`: live captions' recorder (the microphone and the timed words, :mod:`moshi_mlx.caption_recording`)."""
    if directory is None:
        return None
    from ..audio.recording import ConversationRecorder, RecordingError
    from ..audio.recording import recover_unfinished as recover_conversations
    from ..caption_recording import CaptionRecorder
    from ..caption_recording import recover_unfinished as recover_captions

    recover_unfinished = recover_captions if captions else recover_conversations

    folder = Path(directory).expanduser()
    if not folder.parent.exists():  # as --demo-output: a typo in the path is refused, not made into folders
        raise RecordingError(f"--record {directory}: folder {folder.parent} does not exist")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise RecordingError(f"--record {directory}: cannot create the folder ({e.strerror or e})") from None
    try:
        probe_writable(folder, directory)
    except OutputError:
        raise RecordingError(f"--record {directory}: the folder is not writable") from None
    try:
        for files in recover_unfinished(folder):  # what a crash or kill -9 left there
            log(f"recording: finished one an earlier session left unfinished ({files.seconds:.1f} s): {files.stereo}")
    except RecordingError as e:
        log(f"warning: an unfinished recording could not be finished: {first_line(e)}")
    recorder = CaptionRecorder if captions else ConversationRecorder
    return recorder(folder, on_error=lambda line: log(f"error: {line}"))


def save_recording(recorder: ConversationRecorder | CaptionRecorder, info: dict[str, Any]) -> None:
    """Finish the files and say where; a failure is one line, never an exception (the summary still comes)."""
    try:
        files = recorder.finish(info)
    except Exception as e:  # never lose the session summary over a full disk
        log(f"error: the recording could not be saved: {first_line(e)}")
        return
    if files is None:
        log("recording: nothing was recorded")
        return
    log(f"recording saved ({files.seconds:.1f} s): " + ", ".join(str(p) for p in files))


def make_echo_canceller(delay_ms: int):
    """The WebRTC echo canceller, or None (with a clear warning) where it cannot run."""
    from ..audio.echo import AecUnavailable, EchoCanceller

    try:
        return EchoCanceller(delay_ms=delay_ms)
    except AecUnavailable as e:
        log(f"warning: {first_line(e)}; continuing without echo cancellation (use headphones)")
        return None


def echo_summary(echo_canceller) -> str | None:
    """The session's echo-cancellation line (None when it was off); honest when there was no echo."""
    if echo_canceller is None:
        return None
    return f"echo cancellation: {echo_canceller.reduction.describe()}"


class FarEnd(Protocol):
    """The other side of a :class:`TerminalSession`: Moshi on this machine, or a server."""

    #: Mic frames go to :meth:`push` (and both sides are recorded) only while this is true.
    listening: bool
    #: Whether the far end was ever reached (model loaded, a connection made): only then a summary.
    reached: bool

    def push(self, frame: np.ndarray) -> None: ...  # PortAudio's thread: must not wait

    def close(self) -> None: ...

    def counts(self) -> str: ...  # the summary's own part, e.g. "12 frames in, 12 answered, 0 dropped (0.0 s)"

    def latencies(self) -> list[float]: ...  # ms, for the summary's median and max

    def recording_info(self) -> dict[str, Any]: ...  # saved with --record


class TerminalSession:
    """The sound devices on this side, a :class:`FarEnd` on the other, and what the user sees.

    Opening it checks --record's folder and opens the devices (before any slow loading or connecting);
    ``no_sound_hint`` is added to a missing-device error (None: the caller handles that error itself).
    The far end plays Moshi's frames with :meth:`play`, shows text with :meth:`text`, and calls
    :meth:`show_lag` about ten times a second; :meth:`run` runs its loop and closes everything.
    ``playback`` False (live captions): the microphone alone, no echo canceller, the captions' recorder.
    """

    def __init__(
        self, args: argparse.Namespace, far: FarEnd, no_sound_hint: str | None, playback: bool = True
    ) -> None:
        self.far = far
        self.recorder = make_recorder(args.record, captions=not playback)
        # Nothing is played without playback: there is no echo to cancel.
        self.echo_canceller = None if args.no_aec or not playback else make_echo_canceller(args.aec_delay_ms)
        try:
            self.audio = DuplexAudio(
                self._heard, args.input_device, args.output_device, max_queued=args.max_lag_frames + 3,
                echo_canceller=self.echo_canceller, on_output=self._played, playback=playback,
            )
        except NoDefaultDevice as e:
            if no_sound_hint is None:
                raise
            raise NoDefaultDevice(e.kind, f"{e}; or, {no_sound_hint}") from None
        echo = ", echo cancellation on" if self.echo_canceller else ", echo cancellation off" if playback else ""
        log(self.audio.describe() + echo)
        self.display = Display()
        self.stopped_by: str | None = None  # "Ctrl-C" or "SIGTERM" when that ended the session
        self.started = time.monotonic()
        self._warned_drops = 0
        self._last_warn = 0.0
        self._told_silent = False
        # --transcribe-user: the user's words from an STT model on its own thread (attach_user_transcriber)
        self.user_stt = None
        self._user_words: queue.SimpleQueue = queue.SimpleQueue()
        self.user_word_count = 0
        self._t0: float | None = None  # the first frame heard while listening: both speakers' times count from it

    # -- the devices' threads ---------------------------------------------------------------------
    def _heard(self, frame: np.ndarray) -> None:  # PortAudio's thread: the mic
        if self.far.listening:
            if self._t0 is None:
                self._t0 = time.monotonic()
            if self.recorder is not None:  # only while the far end listens: both sides start together
                self.recorder.add_user(frame)
            self.far.push(frame)
            if self.user_stt is not None:  # only queues a copy: never waits
                self.user_stt.push(frame)

    def _played(self, frame: np.ndarray) -> None:  # PortAudio's thread: Moshi's side as it goes out
        if self.recorder is not None and self.far.listening:
            self.recorder.add_moshi(frame)

    # -- the user's words (--transcribe-user) ------------------------------------------------------
    def attach_user_transcriber(self, stt) -> None:
        """Write the user's side down too: `stt` (:class:`~moshi_mlx.model_files.assets.SttAssets`) runs on the
        microphone's frames on its own worker thread; its words are shown and recorded from the main thread."""
        from ..user_transcript import UserTranscriber

        self.user_stt = UserTranscriber(stt.lm, stt.mimi, stt.tokenizer, self._user_words.put)

    def _show_user_words(self) -> None:
        from ..audio.recording import USER

        while True:
            try:
                words = self._user_words.get_nowait()
            except queue.Empty:
                return
            for word in words:
                self.user_word_count += 1
                self.display.speaker(USER, word.start)
                self.display.text(" " + word.text)
                if self.recorder is not None:
                    self.recorder.add_text(" " + word.text, word.start, speaker=USER, end=word.end)

    def _now(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    # -- for the far end ----------------------------------------------------------------------------
    def begin(self) -> None:
        """The summary's clock starts now (the local app: once the model is loaded)."""
        self.started = time.monotonic()

    def start_listening(self, line: str = "listening: speak to Moshi (Ctrl-C to quit)") -> None:
        self.audio.start()
        self.display.message(line)

    def play(self, pcm: np.ndarray) -> None:
        self.audio.play(pcm)

    def text(self, piece: str) -> None:
        if self.user_stt is not None:  # two speakers: Moshi's words get their label and time too
            from ..audio.recording import MOSHI

            self.display.speaker(MOSHI, self._now())
        self.display.text(piece)
        if self.recorder is not None:
            self.recorder.add_text(piece)

    def message(self, line: str) -> None:
        self.display.message(line)

    def check_devices(self) -> None:
        if self.audio.callback_error is not None:
            raise AudioDeviceError(f"audio callback failed: {self.audio.callback_error}")

    def show_lag(
        self, latency_ms: float, dropped: int, warning: Callable[[int, float], str], prefix: str = ""
    ) -> None:
        """The status line (``prefix`` first: the captions' end-of-turn meter); ``warning(dropped, lag_ms)`` at
        most every 2 s while frames are being dropped."""
        now = time.monotonic()
        self._show_user_words()
        if self.user_stt is not None and self.user_stt.error is not None:
            raise self.user_stt.error
        if self.audio.silence.silent and not self._told_silent:  # e.g. macOS before the permission is granted
            self._told_silent = True
            self.display.message(silent_microphone_line())
        lag_ms = latency_ms + self.audio.queued_frames * FRAME_S * 1e3  # the speaker's queue adds to it
        self.display.set_status(prefix + lag_status(lag_ms, dropped, self.audio.stats.underruns), now)
        if dropped > self._warned_drops and now - self._last_warn >= 2.0:
            self.display.message(warning(dropped, lag_ms))
            self._warned_drops, self._last_warn = dropped, now

    # -- the whole session -------------------------------------------------------------------------
    def run(self, loop: Callable[[], None], summary_on_error: bool) -> int:
        """Run the far end's ``loop`` until it returns or Ctrl-C / SIGTERM, then close and sum up.

        The recording is saved however the session ended; the summary comes after an error too only
        with ``summary_on_error`` (the client's lost connection: what it managed matters). Returns the
        exit code: 130 when Ctrl-C / SIGTERM ended it (the shell's policy, after a clean close), else 0.
        """
        failed = True
        try:
            loop()
            failed = False
        except KeyboardInterrupt as e:
            self.stopped_by = shell.stopped_by(e)
            failed = False
        finally:
            with shell.sigint_ignored():  # a second Ctrl-C must not break the cleanup
                self._close(summary=not failed or summary_on_error)
        return shell.EXIT_INTERRUPTED if self.stopped_by else shell.EXIT_OK

    def _close(self, summary: bool) -> None:
        self.audio.close()
        self.far.close()
        if self.user_stt is not None:  # the last words: the model's audio delay flushed with silence
            self.user_stt.close(flush=self.far.reached)
            self._show_user_words()
        self.display.finish()
        if not self.far.reached:
            return
        if self.recorder is not None:
            save_recording(self.recorder, self.far.recording_info())
        if not summary:
            return
        echo_line = echo_summary(self.echo_canceller)
        if echo_line is not None:
            log(echo_line)
        log(self.summary())

    def summary(self) -> str:
        lat = self.far.latencies()
        lat_txt = f", latency median {statistics.median(lat):.0f} ms / max {max(lat):.0f} ms" if lat else ""
        stopped = f" (stopped by {self.stopped_by})" if self.stopped_by else ""
        stt = self.user_stt
        yours = f", your words {self.user_word_count} (STT skipped {stt.dropped} frames)" if stt is not None else ""
        return (
            f"session: {time.monotonic() - self.started:.1f} s, {self.far.counts()}, "
            f"{self.audio.stats.underruns} underruns{lat_txt}{yours}{stopped}"
        )


class LocalMoshi:
    """A far end: the model on this machine, run by an :class:`~moshi_mlx.engine.EngineRunner` (``moshi_mlx.local``)."""

    def __init__(self) -> None:
        self.runner = None  # set once the model is loaded: the mic is ignored until then
        self.engine = None
        self.description = "?"
        self.texts: queue.SimpleQueue = queue.SimpleQueue()
        self._latencies: deque[float] = deque(maxlen=100_000)
        self._failure: list[BaseException] = []

    @property
    def listening(self) -> bool:
        return self.runner is not None

    reached = listening  # the model loaded: the session is summed up

    def push(self, frame: np.ndarray) -> None:
        self.runner.push(frame)

    def start(self, engine, description: str, session: TerminalSession, max_pending: int) -> None:
        from ..engine import EngineRunner

        def on_result(res) -> None:  # the engine's decode thread: hand over, never wait
            session.play(res.pcm)
            self._latencies.append(self.runner.stats.last_latency_ms)
            if res.text:
                self.texts.put(res.text)

        self.engine, self.description = engine, description
        self.runner = EngineRunner(engine, on_result, max_pending=max_pending, on_error=self._failure.append)

    def converse(self, session: TerminalSession) -> None:
        """Until Ctrl-C or a failure: the transcript as it comes, the lag line."""
        self.runner.start()
        session.start_listening()
        while True:
            try:
                session.text(self.texts.get(timeout=0.1))
                while True:
                    session.text(self.texts.get_nowait())
            except queue.Empty:
                pass
            if self._failure or self.runner.error is not None:
                raise self._failure[0] if self._failure else self.runner.error
            session.check_devices()
            st = self.runner.stats
            session.show_lag(st.last_latency_ms, st.dropped, self._drop_warning)

    @staticmethod
    def _drop_warning(dropped: int, lag_ms: float) -> str:
        return (
            f"moshi is behind real time: skipped {dropped} of your frames so far "
            f"({dropped * FRAME_S:.1f} s of audio); lag {lag_ms:.0f} ms"
        )

    def close(self) -> None:
        if self.runner is not None:
            self.runner.stop(timeout=1.0)
        if self.engine is not None:
            self.engine.close()

    def counts(self) -> str:
        st = self.runner.stats
        return f"{st.frames_in} frames in, {st.frames_out} answered, {st.dropped} dropped ({st.dropped * FRAME_S:.1f} s)"

    def latencies(self) -> list[float]:
        return list(self._latencies)

    def recording_info(self) -> dict[str, Any]:
        return {"model": self.description}


def run_app(
    parser: argparse.ArgumentParser, converse: Callable[[argparse.Namespace], int], no_sound_hint: str,
    argv: list[str] | None = None,
) -> int:
    """A terminal front end's main(): the CLI shell, --list-devices, SIGTERM handled like Ctrl-C."""

    def body(args: argparse.Namespace) -> int:
        with shell.sigterm_interrupts():
            if args.list_devices:
                print(list_devices(if_none=no_sound_hint))
                return 0
            return converse(args)

    return shell.run(parser, body, argv)


def entry_points(
    build_parser: Callable[[], argparse.ArgumentParser], converse: Callable[[argparse.Namespace], int],
    no_sound_hint: str,
) -> tuple[Callable[[list[str] | None], int], Callable[[], None]]:
    """A terminal command's ``main(argv)`` (:func:`run_app`) and ``console_main()`` (``main()`` then :func:`exit_now`)."""

    def main(argv: list[str] | None = None) -> int:
        return run_app(build_parser(), converse, no_sound_hint, argv)

    def console_main() -> None:
        exit_now(main())

    return main, console_main


def exit_now(rc: int) -> None:
    """Leave at once, once streams are closed and worker threads stopped.

    PortAudio is released (sound servers such as JACK stall on clients that vanish without closing);
    the rest of the interpreter's teardown (freeing the model, joining idle helper threads), which
    can take half a second, is skipped so that Ctrl-C feels immediate.
    """
    release_portaudio()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)
