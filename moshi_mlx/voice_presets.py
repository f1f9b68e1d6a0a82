"""NVIDIA's PersonaPlex voice presets (torch `.pt` files, e.g. in `voices.tgz`) -> NAME.safetensors, once.

Each `.pt` holds `embeddings` [T, 1, 1, d_model] (the temporal transformer's input at each voice-prompt step)
and `cache` [1, 1 + n_q, max_delay + 3] (NVIDIA's token ring buffer after the prompt). We store them as
`embeddings` [T, d_model] float32 and `cache` [1 + n_q, ring] int32 (moshi_mlx.voices reads them); nothing
else in the archive is read. torch is imported here only: `pip install 'moshi_mlx[voices]'`.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .voices import CACHE_KEY, EMBEDDINGS_KEY, PRESET_SUFFIX, VoiceError

__all__ = ["convert_voices", "preset_arrays"]

TORCH_HINT = "converting voice presets needs torch: pip install 'moshi_mlx[voices]'"


def _torch():
    try:
        import torch
    except ImportError:
        raise VoiceError(TORCH_HINT) from None
    return torch


def preset_arrays(data: bytes, name: str) -> dict[str, np.ndarray]:
    """One `.pt` preset's tensors in our layout (one line if it is not one)."""
    torch = _torch()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not its own
        raise VoiceError(f"{name}: not a torch voice preset ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(state, dict) or EMBEDDINGS_KEY not in state or CACHE_KEY not in state:
        raise VoiceError(f"{name}: not a voice preset (expected a dict with 'embeddings' and 'cache')")
    emb = state[EMBEDDINGS_KEY].detach().to(torch.float32).numpy()
    cache = state[CACHE_KEY].detach().to(torch.int64).numpy()
    emb = emb.reshape(emb.shape[0], emb.shape[-1]) if emb.ndim >= 2 else emb
    cache = cache.reshape(cache.shape[-2], cache.shape[-1]) if cache.ndim >= 2 else cache
    if emb.ndim != 2 or cache.ndim != 2 or emb.shape[0] < 1:
        raise VoiceError(f"{name}: unexpected shapes {list(state[EMBEDDINGS_KEY].shape)}, {list(state[CACHE_KEY].shape)}")
    return {EMBEDDINGS_KEY: np.ascontiguousarray(emb), CACHE_KEY: np.ascontiguousarray(cache.astype(np.int32))}


def _presets(source: Path) -> Iterator[tuple[str, bytes]]:
    """(name, .pt bytes) from a .tgz/.tar archive, a folder of .pt files or one .pt file."""
    if source.is_dir():
        for p in sorted(source.rglob("*.pt")):
            yield p.stem, p.read_bytes()
    elif source.suffix == ".pt":
        yield source.stem, source.read_bytes()
    else:
        try:
            with tarfile.open(source) as tar:
                for member in sorted(tar.getmembers(), key=lambda m: m.name):
                    name = Path(member.name)
                    if member.isfile() and name.suffix == ".pt" and not name.name.startswith("."):
                        yield name.stem, tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise VoiceError(f"{source}: not a voices archive ({e})") from None


def convert_voices(source: str | Path, out_dir: str | Path | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Convert every preset in `source`; writes OUT_DIR/NAME.safetensors (default: a `voices` folder beside
    the source). Returns the files written."""
    from safetensors.numpy import save_file

    source = Path(source).expanduser()
    if not source.exists():
        raise VoiceError(f"--voices {source}: no such file")
    _torch()  # the hint before anything is read
    out = Path(out_dir).expanduser() if out_dir is not None else source.parent / "voices"
    written = []
    for name, data in _presets(source):
        arrays = preset_arrays(data, name)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}{PRESET_SUFFIX}"
        save_file(arrays, str(path))
        written.append(path)
    if not written:
        raise VoiceError(f"--voices {source}: no .pt voice presets in it")
    log(f"wrote {len(written)} voice presets to {out}: {', '.join(p.stem for p in written)}")
    return written
