"""The error base every user-facing failure derives from, and how an error reads on one line."""

from __future__ import annotations

#: The debug switch: tracebacks of unexpected errors, debug logging, and the C libraries' own chatter on stderr.
DEBUG_ENV = "MOSHI_MLX_DEBUG"


class MoshiError(Exception):
    """Something the user can fix, in one line written for them (shown without a traceback)."""


class UsageError(MoshiError):
    """Flags that cannot work together or a malformed argument found after parsing (exit code 2)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (rustymimi appends Rust backtraces),
    or its class name when the message is empty."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def error_line(exc: BaseException) -> str:
    """`error: ...`: a MoshiError's own line; the OS's words for OS errors; else the type and first line
    (an unexpected error: its type is what a bug report needs)."""
    if isinstance(exc, MoshiError):
        return f"error: {first_line(exc)}"
    if isinstance(exc, OSError) and exc.strerror:  # disk full, permission denied, ...
        where = f"{exc.filename}: " if exc.filename else ""
        return f"error: {where}{exc.strerror}"
    if isinstance(exc, OSError) and str(exc).strip():  # libraries' own words ("PortAudio library not found")
        return f"error: {first_line(exc)}"
    return f"error: {type(exc).__name__}: {first_line(exc)}"
