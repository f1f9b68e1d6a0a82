"""Memory budget: which KV precision (and, only if still needed, which window) fits a given budget.

The budget covers what MLX holds for the LM: weights + KV cache + activations and allocator cache (``reserve``).
The MLX Mimi, when that is the codec, lives in MLX's allocator beside it (``codec_bytes``: weights and streams,
fixed for any session length): MLX's limit is the budget plus that, and the plan's line says so. rustymimi and
Python live outside MLX's allocator and are not part of either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

from ..errors import MoshiError
from ..models.cache import DEFAULT_KV_BITS, LENGTH_BUCKET, kv_cache_bytes, on_cuda

GB = 1e9
#: Activations of one step plus MLX's allocator cache (measured: a 7B q4 step needs well under 100 MB).
DEFAULT_RESERVE_BYTES = 256 * 2**20
#: Never shorten the window below this (20 s of conversation); below it the model loses the thread.
MIN_CONTEXT = 250


class BudgetError(MoshiError, ValueError):
    """The model cannot fit the memory budget at any setting we allow."""


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    weight_bytes: int
    kv_bits: int
    context: int
    full_context: int
    kv_bytes: int
    reserve_bytes: int
    codec_bytes: int = 0  # the MLX Mimi inside MLX's allocator, beside the LM (0 for rustymimi, outside it)
    # A speech-to-text model writing the user's words (--transcribe-user) in MLX's allocator: taken out of the
    # budget before the LM's window is chosen, so both fit the one budget.
    stt_bytes: int = 0
    stt_note: str = ""

    @property
    def total_bytes(self) -> int:
        """What the budget must hold: the LM's share, and the user's STT model when there is one."""
        return self.weight_bytes + self.kv_bytes + self.reserve_bytes + self.stt_bytes

    @property
    def mlx_limit_bytes(self) -> int:
        """MLX's allocator limit: the LM's budget and the MLX Mimi beside it."""
        return self.budget_bytes + self.codec_bytes

    def describe(self) -> str:
        window = "full window" if self.context == self.full_context else f"window shortened {self.full_context} -> {self.context} steps"
        return (
            f"memory: budget {self.budget_bytes / GB:.2f} GB; weights {self.weight_bytes / GB:.2f} GB + "
            f"{self.kv_bits}-bit KV {self.kv_bytes / GB:.2f} GB ({window}) + {self.reserve_bytes / GB:.2f} GB reserve"
            + (f" + {self.stt_note or f'STT {self.stt_bytes / GB:.2f} GB'}" if self.stt_bytes else "")
            + (f"; MLX Mimi {self.codec_bytes / GB:.2f} GB beside it (MLX limit {self.mlx_limit_bytes / GB:.2f} GB)"
               if self.codec_bytes else "")
        )


def plan_memory(
    weight_bytes: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    context: int,
    budget_bytes: int,
    kv_bits: int | None = None,
    dtype_bytes: int = 2,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    codec_bytes: int = 0,
    stt_bytes: int = 0,
    stt_note: str = "",
) -> MemoryPlan:
    """Pure: the most precise KV setting (default 8 bits, else 4) whose full window fits; else the longest
    window at the lowest precision. A fixed ``kv_bits`` is kept and only the window may shrink.
    ``stt_bytes`` (the user's STT model, --transcribe-user) comes out of the budget first."""
    choices = [kv_bits] if kv_bits is not None else [b for b in (DEFAULT_KV_BITS, 4) if b <= DEFAULT_KV_BITS]
    room = budget_bytes - weight_bytes - reserve_bytes - stt_bytes

    def size(bits: int, window: int) -> int:
        return kv_cache_bytes(num_layers, num_heads, head_dim, window, bits, dtype_bytes)

    def plan(bits: int, window: int) -> MemoryPlan:
        return MemoryPlan(
            budget_bytes, weight_bytes, bits, window, context, size(bits, window), reserve_bytes, codec_bytes,
            stt_bytes, stt_note,
        )

    for bits in choices:
        if size(bits, context) <= room:
            return plan(bits, context)
    bits = choices[-1]
    per_step = size(bits, LENGTH_BUCKET) / LENGTH_BUCKET
    window = int(room // per_step) if room > 0 else 0
    if window < MIN_CONTEXT:
        raise BudgetError(
            f"the model needs {(weight_bytes + reserve_bytes + stt_bytes + size(bits, MIN_CONTEXT)) / GB:.2f} GB at least "
            f"({bits}-bit KV, {MIN_CONTEXT}-step window) but the memory budget is {budget_bytes / GB:.2f} GB"
        )
    return plan(bits, min(window, context))


def weights_bytes(model) -> int:
    """Bytes of a model's parameters (quantized codes, scales and biases included)."""
    from mlx.utils import tree_flatten

    return int(sum(p.nbytes for _, p in tree_flatten(model.parameters())))


#: Share of a CUDA GPU's own memory the default budget takes: CUDA reports no recommended working set, and MLX's
#: CUDA allocator stops at 95% of it; the rest is for the CUDA context and other users of the GPU.
CUDA_MEMORY_SHARE = 0.9


def machine_budget_bytes() -> int:
    """Default budget: Metal's recommended working set where MLX reports one; on CUDA a share of the GPU's
    own memory (MLX >= 0.30.6 reports it); else 2/3 of RAM (Metal's rule)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info = {}
    for get in (getattr(mx, "device_info", None), getattr(getattr(mx, "metal", None), "device_info", None)):
        try:
            info = get() if get is not None else {}
        except Exception:  # no GPU backend here
            info = {}
        if info:
            break
    recommended = int(info.get("max_recommended_working_set_size", 0) or 0)
    if recommended:
        return min(recommended, ram)
    gpu_memory = int(info.get("total_memory", 0) or 0) if on_cuda() else 0
    return int(gpu_memory * CUDA_MEMORY_SHARE) if gpu_memory else ram * 2 // 3


def apply_limits(plan: MemoryPlan) -> None:
    """Tell MLX's allocator to stay within the plan (cache trimmed to the reserve)."""
    mx.set_memory_limit(plan.mlx_limit_bytes)
    mx.set_cache_limit(plan.reserve_bytes)
