"""Mimi audio codec (rustymimi) behind a small, checked, frame-by-frame API (``FrameCodec``, which the MLX
Mimi of :mod:`moshi_mlx.audio.mlx_mimi` shares).

One frame is 80 ms of 24 kHz mono audio (1920 float32 samples) <-> ``num_codebooks`` codes in [0, 2048).

Long sessions: the rustymimi instances, their pool and handoffs are :mod:`moshi_mlx.audio.mimi_pool`'s;
read its notes for how a session of any length stays within bounded memory.

Memory: each instance holds its own f32 weights plus its position table, 383 MB measured (three: 1151 MB);
a pool of three instead of two per direction saves one copy. Two instances would be the floor, but one
instance serving both directions runs them one after the other (87 ms per frame instead of 54 here).
rustymimi's "bf16" fails on CPU (candle has no bf16 matmul there). "f16" loads in half the memory (630 MB
for three) and gives the same codes, with decoded audio 8.9 % RMS from f32 on the random test weights; but
on x86 its resident memory grows to 2.4 GB within 30 frames of use, and it is 1.6x slower. So f32 stays.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..codec.config import CODEBOOK_SIZE, MAX_CODEBOOKS, TRANSFORMER_CONTEXT
from ..errors import first_line
from .frames import FRAME_SIZE
from .mimi_pool import SAFETY_FRAMES, Lane, MimiError, Pool

__all__ = [
    "CODEBOOK_SIZE",
    "CONTEXT_FRAMES",
    "DEFAULT_OVERLAP_FRAMES",
    "MAX_CODEBOOKS",
    "FrameCodec",
    "Mimi",
    "MimiInputError",
]

POSITIONS_PER_FRAME = 2  #: transformer positions per 80 ms frame
CONTEXT_FRAMES = TRANSFORMER_CONTEXT // POSITIONS_PER_FRAME  #: attention window of Mimi's transformers (10 s)
RUSTYMIMI_DEFAULT_MAX_SEQ_LEN = 8192
#: Frames the spare runs beside the active instance before it takes over (10 s, one attention window).
#: Exact convergence needs up to num_layers (8) windows; measured on random weights, one window already
#: brings codes and decoded audio in line with an instance that never hands off (see tests/unit/audio/test_mimi.py).
DEFAULT_OVERLAP_FRAMES = CONTEXT_FRAMES
#: Frames an instance is active between resets (60 s): bounds each lane's keys/values to ~48 MB in f32.
DEFAULT_MAX_FRAMES = 750
#: Frames an instance may process per direction over its whole life (its position table): at the default
#: turn each direction runs 1.2 frames per frame spread over three instances, 0.4 each, so this lasts a
#: single conversation of about 1.5 hours.
DEFAULT_LIFETIME_FRAMES = 27_000
#: rustymimi instances shared by the two directions: one active each and one spare.
DEFAULT_INSTANCES = 3
# rustymimi preallocates each key/value buffer for max_seq_len positions (8 heads x 64 dims). Buffers of
# 32 MiB or more are always mmapped by glibc, so reset() hands their pages straight back to the OS;
# smaller ones can stay in the heap and fragment it (measured: RSS kept growing across resets).
_MIN_SEQ_LEN = 2 * 16_384 + 64
_DTYPES = ("f32", "f16", "bf16")


class MimiInputError(MimiError, ValueError):
    """Bad input given to Mimi (wrong size, dtype or value); also a ``ValueError``."""


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _single_axis(arr: np.ndarray, n: int, what: str) -> None:
    """``arr`` must hold ``n`` values along one axis (other axes of length 1, at most 3 dims)."""
    if arr.ndim > 3 or arr.size != n or (arr.ndim > 0 and max(arr.shape) != n) or (arr.ndim == 0 and n != 1):
        raise MimiInputError(f"{what} must have shape ({n},), got {arr.shape}")


def check_num_codebooks(num_codebooks) -> None:
    if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, (int, np.integer)):
        raise ValueError(f"num_codebooks must be an int, got {num_codebooks!r}")
    if not 1 <= num_codebooks <= MAX_CODEBOOKS:
        raise ValueError(f"num_codebooks must be in [1, {MAX_CODEBOOKS}], got {num_codebooks}")


def check_pcm_frame(pcm) -> np.ndarray:
    arr = np.asarray(pcm)
    if not np.issubdtype(arr.dtype, np.floating):
        raise MimiInputError(f"pcm must be floating point samples in [-1, 1], got dtype {arr.dtype}")
    _single_axis(arr, FRAME_SIZE, "a pcm frame")
    arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(1, 1, FRAME_SIZE)
    if not np.isfinite(arr).all():
        raise MimiInputError("pcm frame contains NaN or infinite samples")
    return arr


def check_codes(codes, num_codebooks: int, frames: int | None = None) -> np.ndarray:
    """Validate codes; returns uint32 [1, K, F] (F = 1 when ``frames`` is None)."""
    arr = np.asarray(codes)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise MimiInputError(f"codes must be integers, got dtype {arr.dtype}")
    if frames is None:
        _single_axis(arr, num_codebooks, "codes for one frame")
        arr = arr.reshape(1, num_codebooks, 1)
    else:
        if arr.ndim != 2 or arr.shape[0] != num_codebooks:
            raise MimiInputError(f"codes must have shape ({num_codebooks}, frames), got {arr.shape}")
        arr = arr.reshape(1, num_codebooks, arr.shape[1])
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi >= CODEBOOK_SIZE:
            bad = lo if lo < 0 else hi
            raise MimiInputError(f"codes must be in [0, {CODEBOOK_SIZE}), got {bad}")
    return np.ascontiguousarray(arr, dtype=np.uint32)


# --------------------------------------------------------------------------------------------------
# Public class
# --------------------------------------------------------------------------------------------------


class FrameCodec:
    """What both Mimi codecs share: checked frame-by-frame streaming, and whole clips made of frames.

    A codec defines ``encode_frame``, ``decode_frame``, ``reset_encoder``, ``reset_decoder``, ``close`` and
    its memory: ``resident_bytes`` (all it holds) and ``mlx_bytes`` (the part inside MLX's allocator, which
    the memory budget must count), and says what it is in ``memory_note``.
    """

    name = "codec"
    num_codebooks: int
    mlx_bytes = 0

    def encode_frame(self, pcm: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode_frame(self, codes) -> np.ndarray:
        raise NotImplementedError

    def reset_encoder(self) -> None:
        raise NotImplementedError

    def reset_decoder(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release helper threads (optional)."""

    def reset(self) -> None:
        """Start a new, independent stream in both directions."""
        self.reset_encoder()
        self.reset_decoder()

    @property
    def memory_note(self) -> str:
        raise NotImplementedError

    # -- offline -----------------------------------------------------------------------------------
    def encode(self, pcm) -> np.ndarray:
        """Encode a whole clip: float [T] -> uint32 [num_codebooks, ceil(T / 1920)].

        The last partial frame is padded with zeros. The clip is encoded from a fresh state and the
        encoder is reset again afterwards, so do not interleave this with streaming ``encode_frame``.
        """
        arr = np.asarray(pcm)
        if not np.issubdtype(arr.dtype, np.floating):
            raise MimiInputError(f"pcm must be floating point samples in [-1, 1], got dtype {arr.dtype}")
        if arr.ndim != 1:
            if arr.ndim <= 3 and arr.size == max(arr.shape, default=0):
                arr = arr.reshape(-1)
            else:
                raise MimiInputError(f"pcm must be one-dimensional (mono), got shape {arr.shape}")
        n_frames = math.ceil(arr.shape[0] / FRAME_SIZE)
        padded = np.zeros(n_frames * FRAME_SIZE, np.float32)
        padded[: arr.shape[0]] = arr
        if not np.isfinite(padded).all():
            raise MimiInputError("pcm contains NaN or infinite samples")
        out = np.zeros((self.num_codebooks, n_frames), np.uint32)
        self.reset_encoder()
        try:
            for i in range(n_frames):
                out[:, i] = self.encode_frame(padded[i * FRAME_SIZE : (i + 1) * FRAME_SIZE])
        finally:
            self.reset_encoder()
        return out

    def decode(self, codes) -> np.ndarray:
        """Decode a whole clip: integer codes [num_codebooks, F] -> float32 [F * 1920].

        Decoded from a fresh state; the decoder is reset again afterwards.
        """
        c = check_codes(codes, self.num_codebooks, frames=-1)
        n_frames = c.shape[-1]
        out = np.zeros(n_frames * FRAME_SIZE, np.float32)
        self.reset_decoder()
        try:
            for i in range(n_frames):
                out[i * FRAME_SIZE : (i + 1) * FRAME_SIZE] = self.decode_frame(c[0, :, i])
        finally:
            self.reset_decoder()
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Mimi(FrameCodec):
    """Streaming Mimi codec over rustymimi with checked inputs and unbounded session length.

    Args:
        path: the Mimi safetensors file (e.g. ``tokenizer-e351c8d8-checkpoint125.safetensors``).
        num_codebooks: codebooks per frame (1..32; Moshi uses 8).
        max_frames: frames an instance is active between resets (its turn, overlap included; default
            750 = 60 s). Bounds each direction's keys/values to about 64 KiB x ``max_frames`` (f32);
            shorter turns mean more frequent overlaps (each doubles that direction's cost while it lasts).
        overlap_frames: frames the other instance runs beside the active one before taking over
            (default 125 = 10 s, one attention window, capped at ``max_frames // 2``).
        lifetime_frames: frames one instance may process over its life (default 27000); sizes its
            position table, about 1.1 KiB per frame and instance.
        crossfade_frames: decoder crossfade length at a handoff, within the overlap (default 1 = 80 ms).
        dtype: rustymimi compute dtype, "f32" (default), "f16" or "bf16".
        stagger: offset the decoder's handoffs by half a period from the encoder's, so the two
            directions never want the spare at the same time.
        parallel: run the spare's step on a helper thread during an overlap.
        instances: rustymimi instances (each ~390 MB of f32 weights) shared by the two directions:
            one active per direction plus spares (default 3). With one spare, a direction whose turn
            ends while the other holds the spare keeps its instance a little longer.

    ``encode_frame`` and ``decode_frame`` may be called from two different threads; each direction
    serialises its own calls.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_codebooks: int = 8,
        *,
        max_frames: int = DEFAULT_MAX_FRAMES,
        overlap_frames: int | None = None,
        lifetime_frames: int = DEFAULT_LIFETIME_FRAMES,
        crossfade_frames: int = 1,
        dtype: str = "f32",
        stagger: bool = True,
        parallel: bool = True,
        instances: int = DEFAULT_INSTANCES,
    ):
        self.path = Path(path)
        check_num_codebooks(num_codebooks)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        self.num_codebooks = int(num_codebooks)
        self.dtype = dtype
        if isinstance(instances, bool) or not isinstance(instances, (int, np.integer)) or instances < 3:
            raise ValueError(f"instances must be an int >= 3 (one per direction and a spare), got {instances!r}")

        max_frames = int(max_frames)
        if max_frames < 2:
            raise ValueError(f"max_frames must be at least 2, got {max_frames}")
        self.max_frames = max_frames
        lifetime_frames = int(lifetime_frames)
        if lifetime_frames < max_frames:
            raise ValueError(f"lifetime_frames must be at least max_frames = {max_frames}, got {lifetime_frames}")
        self.lifetime_frames = lifetime_frames
        self._max_seq_len = max(_MIN_SEQ_LEN, POSITIONS_PER_FRAME * (lifetime_frames + SAFETY_FRAMES))
        if overlap_frames is None:
            overlap_frames = min(DEFAULT_OVERLAP_FRAMES, self.max_frames // 2)
        overlap_frames = int(overlap_frames)
        crossfade_frames = int(crossfade_frames)
        if not 1 <= overlap_frames <= self.max_frames // 2:
            raise ValueError(
                f"overlap_frames must be in [1, max_frames // 2 = {self.max_frames // 2}], got {overlap_frames}"
            )
        if not 1 <= crossfade_frames <= overlap_frames:
            raise ValueError(f"crossfade_frames must be in [1, overlap_frames], got {crossfade_frames}")
        self.overlap_frames, self.crossfade_frames = overlap_frames, crossfade_frames

        if not self.path.is_file():
            raise MimiError(f"Mimi weights not found: {self.path}")
        try:
            import rustymimi
        except ImportError as e:  # pragma: no cover - a dependency of the package
            raise MimiError(f"rustymimi is not installed ({e}); pip install 'rustymimi>=0.4.1,<0.5'") from None
        self._rustymimi = rustymimi

        period = self.max_frames - self.overlap_frames
        common = dict(max_frames=self.max_frames, overlap=overlap_frames, crossfade=crossfade_frames, parallel=parallel)
        self._pool = Pool(self._load, int(instances), lifetime_frames)
        self._enc = Lane("encoder", self._pool, lambda t, x: t.encode_step(x), **common)
        self._dec = Lane(
            "decoder", self._pool, lambda t, c: t.decode_step(c), phase=period // 2 if stagger else 0, **common
        )

    def _load(self):
        kwargs = {"num_codebooks": self.num_codebooks, "dtype": self.dtype, "max_seq_len": self._max_seq_len}
        if not self.path.is_file():
            raise MimiError(f"Mimi weights not found: {self.path}")
        try:
            return self._rustymimi.Tokenizer(str(self.path), **kwargs)
        except Exception as e:
            detail = first_line(e).replace(f'path: "{self.path}"', "").strip() or type(e).__name__
            raise MimiError(f"cannot load Mimi weights from {self.path}: {detail}") from None

    # -- streaming -------------------------------------------------------------------------------
    def encode_frame(self, pcm: np.ndarray) -> np.ndarray:
        """Encode one 80 ms frame: float [1920] in [-1, 1] -> uint32 [num_codebooks]."""
        x = check_pcm_frame(pcm)
        codes = self._enc.step(x, mix=False)
        return np.ascontiguousarray(codes.reshape(-1)[: self.num_codebooks], dtype=np.uint32)

    def decode_frame(self, codes) -> np.ndarray:
        """Decode one frame: integer codes [num_codebooks] in [0, 2048) -> float32 [1920]."""
        c = check_codes(codes, self.num_codebooks)
        pcm = self._dec.step(c, mix=True)
        return np.ascontiguousarray(pcm.reshape(-1), dtype=np.float32)

    name = "rustymimi"

    def reset(self) -> None:
        """Start a new, independent stream in both directions (worn instances are replaced now)."""
        self.reset_encoder()
        self.reset_decoder()
        self._pool.renew_worn()

    def reset_encoder(self) -> None:
        self._enc.reset()

    def reset_decoder(self) -> None:
        self._dec.reset()

    # -- introspection ---------------------------------------------------------------------------
    @property
    def handoffs(self) -> int:
        """Handoffs completed so far, both directions together."""
        return self._enc.handoffs + self._dec.handoffs

    @property
    def encoder_handoffs(self) -> int:
        return self._enc.handoffs

    @property
    def decoder_handoffs(self) -> int:
        return self._dec.handoffs

    @property
    def loads(self) -> int:
        """rustymimi instances created so far (``instances`` at construction)."""
        return self._pool.loads

    @property
    def live_instances(self) -> int:
        """rustymimi instances alive now (each holds its own copy of the weights)."""
        return self._pool.live

    @property
    def resident_bytes(self) -> int:
        """Memory the live instances took when loaded (weights and position tables; their keys/values,
        at most one turn's worth per direction, come on top)."""
        return self._pool.resident

    @property
    def postponed_frames(self) -> int:
        """Frames a handoff waited for the spare the other direction was using (both directions)."""
        return self._enc.postponed + self._dec.postponed

    @property
    def frames_encoded(self) -> int:
        return self._enc.frames

    @property
    def frames_decoded(self) -> int:
        return self._dec.frames

    def close(self) -> None:
        """Stop the helper threads used during overlaps (optional; idle threads end with the process)."""
        self._enc.close()
        self._dec.close()

    @property
    def memory_note(self) -> str:
        return f"{self.live_instances} rustymimi instances"

    def __repr__(self) -> str:
        return (
            f"Mimi({str(self.path)!r}, num_codebooks={self.num_codebooks}, max_frames={self.max_frames}, "
            f"overlap_frames={self.overlap_frames}, handoffs={self.handoffs})"
        )
