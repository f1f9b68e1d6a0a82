"""Kyutai's PyTorch fixtures (tests/fixtures/kyutai/) through our converter, and the arithmetic to compare.

Kyutai's `LMModel.forward` takes undelayed codes [B, 1 + n_q, T] and returns logits re-aligned with them
(NaN where a codebook's delay leaves no prediction). Our `Lm.forward` takes the delayed layout LmGen steps
through: stream k at column s holds frame s - delay_k, the start token before it. `delayed` builds that
layout from Kyutai's codes (the start tokens stand where Kyutai pads with them too); `undelayed` moves our
logits back onto Kyutai's frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "kyutai"


def convert_fixture(folder: Path, out_dir: Path, weights: str = "model.safetensors", **options):
    """Convert a fixture's PyTorch state dict with its Kyutai config.json (f32), load it: (Lm, config.json)."""
    from moshi_mlx.model_files.checkpoint import load_lm
    from moshi_mlx.model_files.convert import convert
    from moshi_mlx.models.config import LmConfig

    path = convert(folder / weights, out_dir, config=folder / "config.json", dtype="f32", log=lambda m: None,
                   **options)
    written = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    return load_lm(path, LmConfig.from_dict(written)), written


def delayed(codes: np.ndarray, delays: list[int], start: list[int]) -> np.ndarray:
    """Kyutai's undelayed codes [B, K, T] -> our delayed layout (stream k shifted right by delays[k])."""
    out = np.empty_like(codes)
    for k, d in enumerate(delays):
        out[:, k, :d] = start[k]
        out[:, k, d:] = codes[:, k, : codes.shape[2] - d]
    return out


def undelayed(logits: np.ndarray, delays: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Our logits [B, K, T, V] at delayed positions -> Kyutai's frames, and the mask of valid ones."""
    batch, streams, steps, _ = logits.shape
    out = np.full_like(logits, np.nan)
    mask = np.zeros((batch, streams, steps), dtype=bool)
    for k, d in enumerate(delays):
        out[:, k, : steps - d] = logits[:, k, d:]
        mask[:, k, : steps - d] = True
    return out, mask


def cross_entropy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-position cross-entropy [B, K, T] (0 where masked), as Kyutai's moshi.utils.utils.cross_entropy."""
    x = np.where(mask[..., None], logits, 0.0).astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    log_partition = np.log(np.exp(x - top).sum(axis=-1)) + top[..., 0]
    safe = np.where(mask, targets, 0)
    picked = np.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    return np.where(mask, log_partition - picked, 0.0)


def codebook_ce_delta(ours: np.ndarray, ref: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """test_lm.py's criterion: the largest relative gap of per-codebook mean cross-entropy."""
    ce = cross_entropy(ours, targets, mask).mean(axis=(0, 2))
    ce_ref = cross_entropy(ref, targets, mask).mean(axis=(0, 2))
    return float((np.abs(ce - ce_ref) / ce_ref).max())


def max_gap(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Largest |ours - ref| over the valid positions."""
    return float(np.abs(ours - ref)[mask].max())
