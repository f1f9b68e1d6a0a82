"""Is the microphone giving anything at all? Exact zeros from the start mean it is not really open.

On macOS, until the terminal app is allowed the microphone (the first run asks; a refusal sticks), PortAudio
delivers all-zero input with no error, or the open fails with CoreAudio's -66748. A real microphone is never
exactly zero (its noise floor), so a few seconds of exact zeros from the start are said, once, with the fix for
this platform. The check runs in the audio callback: it only counts.
"""

from __future__ import annotations

import sys

import numpy as np

#: Seconds of exact zeros, from the first microphone frame on, before the microphone is called silent.
SILENT_SECONDS = 3.0
#: CoreAudio's status when the app may not use the microphone (the open fails instead of giving zeros).
MAC_PERMISSION_ERROR = "-66748"


def microphone_fix(platform: str | None = None) -> str:
    """What to do about a microphone that gives nothing, on this platform (or `platform`: a sys.platform value)."""
    platform = platform or sys.platform
    if platform == "darwin":
        return ("allow the microphone for your terminal app in System Settings → Privacy & Security → Microphone, "
                "then restart the terminal")
    if platform.startswith("win"):
        return "allow microphone access in Settings → Privacy & security → Microphone"
    return ("check that the input is not muted (alsamixer or pavucontrol) and that --input-device names the "
            "microphone (see --list-devices)")


def silent_microphone_line(platform: str | None = None) -> str:
    return (f"warning: the microphone gives only silence (exact zeros for {SILENT_SECONDS:.0f} s): "
            f"{microphone_fix(platform)}")


def microphone_refused(error: BaseException | None) -> str | None:
    """The one line for a failed open that is macOS refusing the microphone (CoreAudio -66748), not a format
    or device problem; None for any other failure."""
    if error is None or MAC_PERMISSION_ERROR not in str(error):
        return None
    return (f"the microphone cannot be opened: macOS refuses it (CoreAudio error {MAC_PERMISSION_ERROR}); "
            f"{microphone_fix('darwin')}")


class SilentMicCheck:
    """Fed every microphone block as it comes (device rate); :attr:`silent` turns true once, after
    ``seconds`` of exact zeros since the first block, and never if any sample was not zero."""

    def __init__(self, rate: int, seconds: float = SILENT_SECONDS) -> None:
        self.needed = int(rate * seconds)
        self.zeros = 0
        self.heard = False  # some sample was not exactly zero: the check is over
        self.silent = False

    def feed(self, block: np.ndarray) -> None:
        if self.heard or self.silent:
            return
        if np.any(block):
            self.heard = True
            return
        self.zeros += block.size
        self.silent = self.zeros >= self.needed
