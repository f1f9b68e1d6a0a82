"""Ctrl-C and SIGTERM for a command that runs on an asyncio loop (``moshi_mlx.client``).

Inside :meth:`AsyncStop.handling` the two signals set an event instead of raising, so the loop keeps
running long enough to close its connections; :meth:`AsyncStop.until_stopped` runs one step unless a
signal comes first. The first signal is what stopped the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import Any, Awaitable, Iterator

from .shell import signal_name


class AsyncStop:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.by = "Ctrl-C"  # or the first signal's name

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """SIGINT and SIGTERM set the event meanwhile (main thread only); the old handlers come back after."""
        loop = asyncio.get_running_loop()
        handled = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.getsignal(sig)
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    handled.append((sig, old))
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        try:
            yield
        finally:
            for sig, old in handled:
                loop.remove_signal_handler(sig)
                signal.signal(sig, old)  # asyncio would leave the default, not main()'s SIGTERM handler

    def _on_signal(self, signum: int) -> None:
        if not self.event.is_set():
            self.by = signal_name(signum)
        self.event.set()

    async def until_stopped(self, step: Awaitable[Any]) -> Any:
        """Run ``step`` unless a signal comes first (then None, with the step cancelled)."""
        task = asyncio.ensure_future(step)
        stopper = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        return None
