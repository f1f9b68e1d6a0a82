"""How much memory this process holds: its resident set now and its peak (for the benchmark and Mimi)."""

from __future__ import annotations

import resource
import sys

import psutil


def rss_bytes() -> int:
    """The process's resident set now (psutil: Linux, macOS and Windows alike). The process is looked up
    per call, so a forked child reads its own memory, not its parent's."""
    return int(psutil.Process().memory_info().rss)


def rss_peak_bytes() -> int:
    """The process's peak resident set since it started (ru_maxrss: bytes on macOS, KiB on Linux)."""
    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def maxrss_bytes(ru_maxrss: int) -> int:
    """A rusage's ru_maxrss in bytes (macOS counts bytes, Linux KiB); also for a child's rusage from os.wait4."""
    return int(ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024)
