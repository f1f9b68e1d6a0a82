"""Progress on stderr: tqdm bars (live on a terminal, a whole line every few seconds in a log) and pace()."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm


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

    def callback(self, desc: str, unit: str = "layer", **options: object) -> Callable[[int, int], None]:
        """A `progress(done, total)` callback (as the loader and run_inference take) drawing one bar;
        `options` go to tqdm (e.g. unit_scale for bytes)."""
        state: dict[str, object] = {}

        def show(done: int, total: int) -> None:
            if "bar" not in state:
                state["bar"] = self.bar(total, desc, unit, **options)
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
