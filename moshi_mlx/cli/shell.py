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
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Iterator

from ..errors import DEBUG_ENV, MoshiError, UsageError, error_line

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

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
