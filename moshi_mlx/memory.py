"""How much memory this process holds: its resident set now and its peak (for the benchmark and Mimi)."""

from __future__ import annotations

import os
import resource
import sys

import psutil

_PROCESS = psutil.Process(os.getpid())


def rss_bytes() -> int:
    """The process's resident set now (psutil: Linux, macOS and Windows alike)."""
    return int(_PROCESS.memory_info().rss)


def rss_peak_bytes() -> int:
    """The process's peak resident set since it started (ru_maxrss: bytes on macOS, KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
