"""One shell for every command-line entry point: flags checked before anything loads, one error policy.

Exit codes, the same for `local`, `local_web`, `client`, `run_inference`, `convert` and the benchmark:

* 0: done;
* 1: a `MoshiError`, something the user can fix, said in one line (`error: ...`), or an unexpected
  error (one line naming its type; `--verbose` or MOSHI_MLX_DEBUG=1 shows the traceback);
* 2: bad or conflicting flags (argparse's usage errors, and `UsageError`);
* 130: interrupted (Ctrl-C, or SIGTERM where the front end maps it to Ctrl-C).

Messages go through `logging` (logger "moshi_mlx"), to stderr, without decoration.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

from .errors import MoshiError, UsageError, error_line

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEBUG_ENV = "MOSHI_MLX_DEBUG"

log = logging.getLogger("moshi_mlx")


def setup_logging(verbose: bool = False) -> None:
    """Plain lines on stderr for the "moshi_mlx" loggers (idempotent: tests call main() repeatedly)."""
    level = logging.DEBUG if verbose or os.environ.get(DEBUG_ENV) else logging.INFO
    log.setLevel(level)
    log.propagate = False
    for handler in list(log.handlers):
        if getattr(handler, "_moshi_cli", False):
            log.removeHandler(handler)
    handler = _StderrHandler()
    handler._moshi_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest's capsys and redirections swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def say(message: str) -> None:
    """A progress or status line for the user (stderr, through logging)."""
    log.info(message)


def run(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int | None],
    argv: list[str] | None = None,
    interrupted: str = "interrupted",
) -> int:
    """Parse (usage errors exit 2 before anything loads), then run `body(args)` under the error policy."""
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False) or os.environ.get(DEBUG_ENV))
    setup_logging(verbose)
    try:
        return int(body(args) or EXIT_OK)
    except KeyboardInterrupt:
        log.error(interrupted)
        return EXIT_INTERRUPTED
    except UsageError as e:
        log.error(error_line(e))
        return EXIT_USAGE
    except Exception as e:  # the policy: every failure is one line; tracebacks only on request
        if verbose and not isinstance(e, MoshiError):
            traceback.print_exc()
        log.error(error_line(e))
        return EXIT_ERROR


# -- signals: SIGTERM ends a session the way Ctrl-C does, and the summary says which ----------------
class SignalInterrupt(KeyboardInterrupt):
    """A signal (SIGTERM) ending a session the way Ctrl-C does, so every cleanup path runs; names the signal."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def signal_name(signum: int) -> str:
    """ "Ctrl-C" for SIGINT (what the user pressed), else the signal's name ("SIGTERM")."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def stopped_by(interrupt: BaseException) -> str:
    """What ended a session, from the KeyboardInterrupt that ended it: "SIGTERM" or "Ctrl-C"."""
    return interrupt.signame if isinstance(interrupt, SignalInterrupt) else "Ctrl-C"


def raise_interrupt(signum, frame):
    raise SignalInterrupt(signal_name(signum))


@contextlib.contextmanager
def _handling(signum: int, handler) -> Iterator[None]:
    """`handler` for `signum` meanwhile (main thread only: elsewhere Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, old)


def sigterm_interrupts() -> contextlib.AbstractContextManager[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so a killed run still cleans up (and saves)."""
    return _handling(signal.SIGTERM, raise_interrupt)


def sigint_ignored() -> contextlib.AbstractContextManager[None]:
    """A second Ctrl-C must not break the cleanup."""
    return _handling(signal.SIGINT, signal.SIG_IGN)


# -- progress ------------------------------------------------------------------------------------
class _LineStream:
    """Turns tqdm's carriage-return redraws into whole lines, for logs and pipes (not a terminal)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self._stream.write(text + "\n")

    def flush(self) -> None:
        self._stream.flush()


class Progress:
    """Progress bars on stderr (tqdm): a live bar on a terminal, a line every `interval_s` otherwise."""

    def __init__(self, enabled: bool = True, interval_s: float = 10.0) -> None:
        self.enabled = enabled
        self.interval_s = interval_s

    def bar(self, total: int, desc: str, unit: str = "step", **options: object) -> "tqdm":
        from tqdm import tqdm

        stream = sys.stderr
        if stream.isatty():
            return tqdm(total=total, desc=desc, file=stream, leave=False, unit=unit, dynamic_ncols=True,
                        disable=not self.enabled, **options)
        # tqdm redraws with "\r"; in a log that would be one endless line, so each redraw becomes a line,
        # at most one per interval plus the last.
        return tqdm(total=total, desc=desc, file=_LineStream(stream), leave=True, unit=unit, ncols=80,
                    mininterval=self.interval_s, maxinterval=self.interval_s, ascii=True, disable=not self.enabled,
                    **options)

    def callback(self, desc: str, unit: str = "layer") -> Callable[[int, int], None]:
        """A `progress(done, total)` callback (as the loader and run_inference take) drawing one bar."""
        state: dict[str, object] = {}

        def show(done: int, total: int) -> None:
            if "bar" not in state:
                state["bar"] = self.bar(total, desc, unit)
            state["bar"].update(done - state["bar"].n)
            if done == total:
                state.pop("bar").close()

        return show


def pace(audio_seconds: float, wall_seconds: float) -> str:
    """How processing compared with real time, in words nobody misreads ("0.28x real time" was read both ways)."""
    if audio_seconds <= 0 or wall_seconds <= 0:
        return "no timing"
    ratio = audio_seconds / wall_seconds
    if ratio >= 1:
        return f"{ratio:.2f}x faster than real time"
    return f"{1 / ratio:.2f}x slower than real time"


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks of unexpected errors")


# -- argparse types: a bad value is one usage line before anything loads -----------------------------
def number(low: float | None = None, high: float | None = None, open_low: bool = False) -> Callable[[str], float]:
    """A finite float, at least (or, with open_low, above) `low` and at most `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value < low or (open_low and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if open_low else '>='} {low:g}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text!r}")
        return value

    return parse


def integer(low: int = 0, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text!r}")
        return value

    return parse


SEED = integer(0, 2**63 - 1)
#: Sampling flags' destinations: the same names as the WebSocket query parameters (Kyutai's protocol).
SAMPLING_PARAMS = (
    "text_temperature", "text_topk", "audio_temperature", "audio_topk", "repetition_penalty",
    "repetition_penalty_context", "pad_mult", "seed", "text_seed", "audio_seed",
)


def add_sampling_args(parser: argparse.ArgumentParser, server_defaults: bool = False) -> None:
    """The sampling flags of every front end (the app's engine, or a remote server with server_defaults).

    With `server_defaults`, flags left out are None, so only what the user gave is sent.
    """
    from .settings import DEFAULT_AUDIO_SAMPLING, DEFAULT_TEXT_CONTROLS, DEFAULT_TEXT_SAMPLING

    def default(value: object) -> object:
        return None if server_defaults else value

    title = "sampling (sent to the server; left out: the server's defaults)" if server_defaults else "sampling"
    g = parser.add_argument_group(title)
    g.add_argument("--text-temperature", type=number(0.0), default=default(DEFAULT_TEXT_SAMPLING.temperature),
                   help=f"text sampling temperature, 0 = greedy (default {DEFAULT_TEXT_SAMPLING.temperature})")
    g.add_argument("--text-topk", type=integer(0), default=default(DEFAULT_TEXT_SAMPLING.top_k),
                   help=f"sample among the K likeliest text tokens, 0 = all (default {DEFAULT_TEXT_SAMPLING.top_k})")
    g.add_argument("--audio-temperature", type=number(0.0), default=default(DEFAULT_AUDIO_SAMPLING.temperature),
                   help=f"audio sampling temperature, 0 = greedy (default {DEFAULT_AUDIO_SAMPLING.temperature})")
    g.add_argument("--audio-topk", type=integer(0), default=default(DEFAULT_AUDIO_SAMPLING.top_k),
                   help=f"sample among the K likeliest audio codes, 0 = all (default {DEFAULT_AUDIO_SAMPLING.top_k})")
    g.add_argument(
        "--repetition-penalty", type=number(0.0, open_low=True), default=default(DEFAULT_TEXT_CONTROLS.repetition_penalty),
        help="penalise text tokens Moshi used recently (> 1 penalises; default 1.0: off)",
    )
    g.add_argument(
        "--repetition-penalty-context", type=integer(0), default=default(DEFAULT_TEXT_CONTROLS.repetition_penalty_context),
        metavar="N", help="how many recent text tokens (not padding) the penalty looks at (default 64)",
    )
    g.add_argument(
        "--pad-mult", type=number(), default=default(DEFAULT_TEXT_CONTROLS.pad_mult),
        help="multiply the text padding probability by exp(PAD_MULT); negative: Moshi talks more (default 0)",
    )
    g.add_argument("--seed", type=SEED, default=None, help="seed for reproducible sampling (both streams)")
    g.add_argument("--text-seed", type=SEED, default=None, help="seed of the text stream (overrides --seed)")
    g.add_argument("--audio-seed", type=SEED, default=None, help="seed of the audio stream (overrides --seed)")
