"""One-line error messages for the command-line front ends."""

from __future__ import annotations


class MoshiError(Exception):
    """Base of every error whose message is one line written for the user (printed without a traceback)."""

# Errors whose message is written for the user: printed without their class name.
USER_ERRORS = frozenset(
    {
        "HubError", "WeightsError", "MimiError", "MimiInputError", "TokenizerError",
        "AudioDeviceError", "AudioFileError", "WebUiMissing", "TlsError", "RecordingError", "OutputError",
        "BadUrl", "ServerUnreachable", "ServerRefused", "ProtocolFailure", "ConnectionLost",
    }
)


def _lines(exc: BaseException) -> list[str]:
    return [ln.strip() for ln in str(exc).splitlines() if ln.strip()]


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (rustymimi appends Rust backtraces),
    or its class name when the message is empty."""
    lines = _lines(exc)
    return lines[0] if lines else type(exc).__name__


def error_line(exc: BaseException, also_user_errors: frozenset[str] = frozenset()) -> str:
    """`error: ...` for stderr; the class name is shown only for unexpected errors."""
    lines = _lines(exc)
    msg = lines[0] if lines else ""
    known = type(exc).__name__ in USER_ERRORS or type(exc).__name__ in also_user_errors
    label = "" if known and msg else f"{type(exc).__name__}: "
    return f"error: {label}{msg}"
