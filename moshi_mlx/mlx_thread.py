"""A long-lived thread with its own MLX stream, where a component runs all of its MLX work.

MLX streams belong to the thread that created them, so work submitted from whichever thread happens to call
(an audio callback, a web handler, a fresh runner) would need a new stream each time. A stream left behind by a
finished thread also aborts the process at exit ("terminate called without an active exception", exit code
134), so the thread destroys its streams before it ends, and live ones are closed at interpreter exit.
Used by the conversation engine (the LM) and by each direction of the MLX Mimi.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from concurrent.futures import Future
from typing import Callable

import mlx.core as mx


class MlxThread:
    """Runs submitted jobs in order on one thread and one MLX stream (on `device`, default MLX's own).

    The thread starts on the first job and again after `close()`.
    """

    _live: "weakref.WeakSet[MlxThread]" = weakref.WeakSet()

    def __init__(self, name: str = "moshi-mlx", device: mx.Device | None = None) -> None:
        self.name, self.device = name, device
        self._jobs: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _serve(self, jobs: queue.SimpleQueue) -> None:
        mx.set_default_stream(mx.new_stream(self.device if self.device is not None else mx.default_device()))
        try:
            while (job := jobs.get()) is not None:
                future, fn, args = job
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as e:
                        future.set_exception(e)
        finally:
            mx.synchronize()
            if hasattr(mx, "clear_streams"):  # MLX >= 0.31.2 (macOS 13 stops at 0.29.3): frees this thread's stream
                mx.clear_streams()

    def submit(self, fn: Callable, *args: object) -> Future:
        future: Future = Future()
        with self._lock:
            if self._thread is None:
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._serve, args=(self._jobs,), name=self.name, daemon=True)
                self._thread.start()
                MlxThread._live.add(self)
            self._jobs.put((future, fn, args))
        return future

    def run(self, fn: Callable, *args: object):
        """`fn(*args)` on the thread, waited for (called directly when already on it)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self.submit(fn, *args).result()

    def close(self) -> None:
        with self._lock:
            thread, jobs = self._thread, self._jobs
            self._thread = self._jobs = None
        if thread is not None:
            jobs.put(None)
            if thread is not threading.current_thread():
                thread.join()

    @classmethod
    def _close_all(cls) -> None:
        for worker in list(cls._live):
            worker.close()


atexit.register(MlxThread._close_all)
