"""What the terminal front ends share (``moshi_mlx.local`` and ``moshi_mlx.client``).

The live transcript and lag line (:class:`Display`), the audio and ``--record`` flags, the echo
canceller and recorder set-up, Ctrl-C / SIGTERM handling and the quick exit once everything is closed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..audio.devices import list_devices, release_portaudio
from ..errors import first_line
from ..outputs import OutputError, probe_writable
from . import shell
from .flags import integer

if TYPE_CHECKING:
    from ..audio.recording import ConversationRecorder


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
        help="save the conversation into DIR when it ends (also on Ctrl-C): stereo WAV (you left, Moshi right), "
        "mixed mono WAV, transcript .txt and .json; never overwrites an earlier recording",
    )


def make_recorder(directory: str | None) -> ConversationRecorder | None:
    """A recorder for --record DIR, after checking DIR can be written (before any slow loading or connecting)."""
    if directory is None:
        return None
    from ..audio.recording import ConversationRecorder, RecordingError

    folder = Path(directory).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecordingError(f"--record {directory}: cannot create the folder ({e.strerror or e})") from None
    try:
        probe_writable(folder, directory)
    except OutputError:
        raise RecordingError(f"--record {directory}: the folder is not writable") from None
    return ConversationRecorder()


def save_recording(recorder: ConversationRecorder, directory: str, info: dict[str, Any]) -> None:
    """Write the files and say where; a failure is one line, never an exception (the summary still comes)."""
    if recorder.empty:
        log("recording: nothing was recorded")
        return
    try:
        files = recorder.save(directory, info)
    except Exception as e:  # never lose the session summary over a full disk
        log(f"error: the recording could not be saved: {first_line(e)}")
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


def lag_status(lag_ms: float, dropped: int, underruns: int) -> str:
    """The status line's text; the same in both front ends (tests parse it)."""
    return f"lag {lag_ms:4.0f} ms | dropped {dropped} | underruns {underruns}"


class Display:
    """Transcript on stdout, status on stderr; all writes happen on the main thread.

    On a terminal the words being spoken and a small lag indicator share one live line on stderr;
    finished lines go to stdout. Otherwise every piece goes to stdout as it comes and a status line
    goes to stderr about once a second when something changed.
    """

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty() and sys.stderr.isatty()
        self.line = ""
        self.status = ""
        self._last_status_print = 0.0
        self._printed_status = ""

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((100, 24)).columns - 1)

    def _redraw(self) -> None:
        tail = f"  [{self.status}]" if self.status else ""
        room = self._width() - len(tail)
        text = self.line if len(self.line) <= room else "…" + self.line[-(room - 1):]
        sys.stderr.write("\r\033[K" + text + "\033[2m" + tail + "\033[0m")
        sys.stderr.flush()

    def _clear(self) -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()

    def text(self, piece: str) -> None:
        if not self.tty:
            sys.stdout.write(piece)
            sys.stdout.flush()
            return
        self.line += piece
        limit = self._width() - 30
        if len(self.line) > limit:  # commit the line at a word boundary
            cut = self.line.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            self._clear()
            sys.stdout.write(self.line[:cut].strip() + "\n")
            sys.stdout.flush()
            self.line = self.line[cut:]
        self._redraw()

    def set_status(self, status: str, now: float) -> None:
        self.status = status
        if self.tty:
            self._redraw()
        elif status != self._printed_status and now - self._last_status_print >= 1.0:
            self.message(f"[status] {status}")
            self._printed_status, self._last_status_print = status, now

    def message(self, msg: str) -> None:
        """A whole line on stderr (warnings, summary)."""
        if self.tty:
            self._clear()
        sys.stdout.flush()
        print(msg, file=sys.stderr, flush=True)
        if self.tty and (self.line or self.status):
            self._redraw()

    def finish(self) -> None:
        if self.tty:
            self._clear()
            if self.line.strip():
                sys.stdout.write(self.line.strip() + "\n")
        else:
            sys.stdout.write("\n")
        sys.stdout.flush()


def echo_summary(echo_canceller) -> str | None:
    """The session's echo-cancellation line (None when it was off); honest when there was no echo."""
    if echo_canceller is None:
        return None
    return f"echo cancellation: {echo_canceller.reduction.describe()}"


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
