"""The terminal's live view: Moshi's words as they come, and a lag line (:class:`Display`).

What :class:`~moshi_mlx.cli.terminal.TerminalSession` shows; it only writes text (tests drive it with a fake tty).
"""

from __future__ import annotations

import shutil
import sys


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
        self._started = False  # anything written to stdout yet
        self.speaking: str | None = None  # with two speakers (--transcribe-user): whose line is open

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
        self._started = True
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

    def write_line(self, line: str) -> None:
        """A whole line on stdout (a captioned word with its times), under the live line on a terminal."""
        if self.tty:
            self._clear()
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if self.tty and (self.line or self.status):
            self._redraw()

    def speaker(self, name: str, seconds: float) -> None:
        """Two speakers: when `name` takes over, the open line ends and a new one starts with `[time] name:`."""
        if name == self.speaking:
            return
        self.speaking = name
        label = f"[{seconds:7.1f} s] {name}:"
        if not self.tty:
            sys.stdout.write(("\n" if self._started else "") + label)
            sys.stdout.flush()
            self._started = True
            return
        if self.line.strip():
            self._clear()
            sys.stdout.write(self.line.strip() + "\n")
            sys.stdout.flush()
        self.line = label
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
