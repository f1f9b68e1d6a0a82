"""What the commands share, and nothing below them imports: the shell, shared flags, progress, the terminal.

The face keeps `cli.run`, `cli.say`, `cli.Progress`, ... working for the commands; `terminal` is imported
from its own module (it pulls in the audio devices).
"""

from .flags import (
    SAMPLING_PARAMS,
    SEED,
    add_codec_args,
    add_engine_args,
    add_lag_arg,
    add_memory_args,
    add_model_args,
    add_sampling_args,
    add_transcribe_user_arg,
    add_verbose_arg,
    integer,
    load_from_args,
    load_user_stt,
    number,
    resolve_user_stt,
    settings_from_args,
)
from .progress import Progress, pace
from .shell import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    SignalInterrupt,
    log,
    run,
    say,
    setup_logging,
    sigint_ignored,
    signal_name,
    sigterm_interrupts,
    stopped_by,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Progress",
    "SAMPLING_PARAMS",
    "SEED",
    "SignalInterrupt",
    "add_codec_args",
    "add_engine_args",
    "add_lag_arg",
    "add_memory_args",
    "add_model_args",
    "add_sampling_args",
    "add_transcribe_user_arg",
    "add_verbose_arg",
    "integer",
    "load_from_args",
    "load_user_stt",
    "log",
    "number",
    "resolve_user_stt",
    "pace",
    "run",
    "say",
    "settings_from_args",
    "setup_logging",
    "sigint_ignored",
    "signal_name",
    "sigterm_interrupts",
    "stopped_by",
]
