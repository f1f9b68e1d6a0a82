"""The rustymimi instances behind :class:`~moshi_mlx.audio.mimi.Mimi`: a pool shared by the two
directions (*lanes*), and the handoffs that keep a session of any length within bounded memory.

Long sessions, bounded memory
-----------------------------
What rustymimi 0.4.1 does (measured, and read from its source):

* Each transformer layer appends every position's keys/values to a buffer preallocated for
  ``max_seq_len`` positions and only *reads* the last 250 (Mimi's attention window). Pages of that buffer
  are touched as positions are written: about 64 KiB per 80 ms frame and direction in f32, without end.
* ``reset()`` drops those buffers (resident memory returns to the OS when they are large enough for the
  allocator to map them directly, which :class:`Mimi` ensures) but does **not** rewind the rotary position
  counter: an instance can process ``max_seq_len / 2`` frames in its whole life, resets included.
* Creating an instance takes 0.5-2 s on a small CPU and holds the GIL throughout (every Python thread,
  the audio callback included, stalls); stepping releases it.

So the two directions (*lanes*) share a small pool of instances, **created once** (three by default):

* Each lane has an active instance, which runs for ``max_frames`` frames (its *turn*). For the last
  ``overlap_frames`` of the turn the lane borrows a freshly reset spare from the pool and feeds it the very
  same input beside it; Mimi's transformers attend to 250 positions (10 s, 125 frames), so its state
  converges to the active one's (exactly after at most one window per layer, 8 windows; in practice within
  about one, see ``DEFAULT_OVERLAP_FRAMES``).
* Then the spare takes over and the old instance is reset, which frees its keys/values, and goes back to the
  pool, where the *other* lane may borrow it next (reset clears both halves). A lane therefore holds at most
  ``max_frames`` frames of keys/values whatever the session length.
* The encoder switches between two frames; the decoder crossfades over the last ``crossfade_frames``
  frames of the overlap, so there is no click. The decoder's turns are staggered by half a period so the
  two lanes never want the one spare at the same time; if they do (one direction reset on its own, an
  offline clip), the later lane keeps its active instance a few frames longer instead of loading one.
* An instance is used by one lane at a time (rustymimi's calls take it exclusively), so the encoder and
  the decoder keep running in parallel (measured here: 54 ms per frame for both in parallel, 87 ms when
  one instance serves both in turn).
* Each instance's position table is sized for ``lifetime_frames`` of its own frames per direction (about
  1.1 KiB per frame, fixed at load). An instance that has used half of it is replaced at the next
  ``reset()`` (between conversations); only a single conversation longer than about
  ``lifetime_frames / 0.4`` frames loads one mid-conversation (with the GIL stall above).

Memory: each instance holds its own f32 weights plus its position table, 383 MB measured (three: 1151 MB);
a pool of three instead of two per direction saves one copy (see :mod:`moshi_mlx.audio.mimi` for the dtype).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ..errors import MoshiError, first_line
from ..memory import rss_bytes

SAFETY_FRAMES = 4  # never run an instance right up to its position table's end


class MimiError(MoshiError, RuntimeError):
    """A failure of the Mimi codec (missing or bad weights, an error inside rustymimi)."""


class Instance:
    """One rustymimi Tokenizer and how many frames each direction has run through it since it was loaded
    (its encoder and decoder transformers count positions separately, and reset() rewinds neither)."""

    __slots__ = ("tokenizer", "used", "resident")

    def __init__(self, tokenizer: object, resident: int):
        self.tokenizer = tokenizer
        self.used = {"encoder": 0, "decoder": 0}
        self.resident = resident  # bytes the process's resident set grew by when it was loaded


class Pool:
    """The rustymimi instances of one :class:`Mimi`, created once and lent to the two directions.

    Each direction holds one active instance; the free ones are freshly reset spares that either
    direction borrows for its overlap. An instance is used by one direction at a time (rustymimi's
    calls take the object exclusively), so encoder and decoder still run in parallel.
    """

    def __init__(self, load: Callable[[], object], size: int, lifetime: int):
        self._load, self.size, self.lifetime = load, size, lifetime
        self.lock = threading.Lock()
        self.loads = 0
        self.live = 0
        self.resident = 0
        self.free: list[Instance] = [self.load() for _ in range(size)]

    def load(self) -> Instance:
        before = rss_bytes()
        try:
            tokenizer = self._load()
        except MimiError:
            raise
        except Exception as e:
            raise MimiError(f"could not load a fresh Mimi instance: {first_line(e)}") from None
        inst = Instance(tokenizer, max(0, rss_bytes() - before))
        with self.lock:  # the two directions may load at once (rare)
            self.loads += 1
            self.live += 1
            self.resident += inst.resident
        return inst

    def _drop(self, inst: Instance) -> None:  # called with the lock held
        self.live -= 1  # the last reference goes with the caller's: rustymimi frees its weights
        self.resident -= inst.resident

    def take(self, direction: str, frames: int, must: bool) -> Instance | None:
        """A reset instance with ``frames`` of ``direction``'s life left; None if none is free (unless
        ``must``: then one is loaded, the rare GIL-holding case)."""
        with self.lock:
            for i, inst in enumerate(self.free):
                if inst.used[direction] + frames <= self.lifetime:
                    return self.free.pop(i)
            if self.free:  # free but worn out for this direction: replace it
                self._drop(self.free.pop())
            elif not must:
                return None
        return self.load()

    def give(self, inst: Instance) -> None:
        """Return a reset instance; beyond ``size`` live instances (after a forced load) it is let go."""
        with self.lock:
            if self.live > self.size:
                self._drop(inst)
            else:
                self.free.append(inst)

    def renew_worn(self) -> None:
        """Between conversations: free instances past half their life in either direction are replaced."""
        with self.lock:
            worn = [i for i in self.free if max(i.used.values()) > self.lifetime // 2]
            for inst in worn:
                self.free.remove(inst)
                self._drop(inst)
        for _ in worn:
            fresh = self.load()
            with self.lock:
                self.free.append(fresh)


# --------------------------------------------------------------------------------------------------
# One direction (encoder or decoder) with handoffs
# --------------------------------------------------------------------------------------------------


class Lane:
    """One direction: an active instance, and a spare borrowed from the pool for each handoff."""

    def __init__(
        self,
        name: str,
        pool: Pool,
        step: Callable[[object, np.ndarray], np.ndarray],
        max_frames: int,
        overlap: int,
        crossfade: int,
        phase: int = 0,
        parallel: bool = True,
    ):
        self.name, self.pool, self._step = name, pool, step
        self.max_frames, self.overlap, self.crossfade = max_frames, overlap, crossfade
        self.parallel = parallel
        self.lock = threading.Lock()
        self.active = pool.take(name, max_frames, must=True)
        # ``phase`` pretends the first instance has already run that many frames (staggers lanes).
        self.phase = phase
        self.active_frames = phase
        self.spare: Instance | None = None
        self.spare_frames = 0
        self.handoffs = 0
        self.postponed = 0  # frames a handoff waited because the other direction had the spare
        self.frames = 0
        self._helper: ThreadPoolExecutor | None = None

    # -- helpers -----------------------------------------------------------------------------------
    def _run(self, inst: Instance, x):
        try:
            out = self._step(inst.tokenizer, x)
        except Exception as e:  # rustymimi raises ValueError/TypeError with a Rust backtrace
            raise MimiError(f"rustymimi failed: {first_line(e)}") from None
        if out is None:
            raise MimiError("rustymimi returned no output for a full frame")
        inst.used[self.name] += 1
        return out

    def _run_both(self, x):
        if not self.parallel:
            return self._run(self.active, x), self._run(self.spare, x)
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mimi-spare")
        fut = self._helper.submit(self._run, self.spare, x)
        try:
            a = self._run(self.active, x)
        finally:
            s = fut.result()
        return a, s

    def _crossfade(self, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Mix for the spare's frame number ``spare_frames`` (1-based) within the crossfade window."""
        j = self.spare_frames - (self.overlap - self.crossfade) - 1  # 0 .. crossfade-1
        if j < 0:
            return old
        n = old.shape[-1]
        t = (np.arange(n, dtype=np.float64) + j * n + 0.5) / (self.crossfade * n)
        w = (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)  # raised cosine, 0 -> 1
        return old * (1.0 - w) + new * w

    @staticmethod
    def _reset(inst: Instance) -> None:
        try:
            inst.tokenizer.reset()  # frees the instance's keys/values
        except Exception as e:
            raise MimiError(f"rustymimi reset failed: {first_line(e)}") from None

    def _borrow_spare(self) -> None:
        # The active instance must keep going while the other direction holds the spare; it may
        # only when its own life leaves room for a later overlap.
        must = self.active.used[self.name] + self.overlap + SAFETY_FRAMES >= self.pool.lifetime
        self.spare = self.pool.take(self.name, self.max_frames, must=must)
        self.spare_frames = 0
        if self.spare is None:
            self.postponed += 1

    # -- API ---------------------------------------------------------------------------------------
    def step(self, x: np.ndarray, mix: bool) -> np.ndarray:
        with self.lock:
            if self.spare is None and self.active_frames >= self.max_frames - self.overlap:
                self._borrow_spare()
            if self.spare is None:
                out = self._run(self.active, x)
                self.active_frames += 1
            else:
                old, new = self._run_both(x)
                self.active_frames += 1
                self.spare_frames += 1
                out = self._crossfade(old, new) if mix else old
                if self.spare_frames >= self.overlap:
                    retired = self.active
                    self.active, self.spare = self.spare, None
                    self.active_frames, self.spare_frames = self.spare_frames, 0
                    self._reset(retired)
                    self.pool.give(retired)
                    self.handoffs += 1
            self.frames += 1
            return out

    def reset(self) -> None:
        """New stream: instances reset; an active one past half its life is replaced now, between streams."""
        with self.lock:
            if self.spare is not None:
                self._reset(self.spare)
                self.pool.give(self.spare)
                self.spare, self.spare_frames = None, 0
            self._reset(self.active)
            if self.active.used[self.name] > self.pool.lifetime // 2:
                worn, self.active = self.active, self.pool.take(self.name, self.pool.lifetime // 2, must=True)
                self.pool.give(worn)
            self.active_frames = self.phase

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None
