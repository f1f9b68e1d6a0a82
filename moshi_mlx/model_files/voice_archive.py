"""A model's voice presets archive (PersonaPlex's `voices.tgz`) unpacked once into the app's cache, its torch
presets converted there once where torch is installed (`convert --voices`'s code), so a run needs no torch.

The folder is keyed by the archive's name, size and modification time, so a second start (or a second archive)
finds its own folder ready; it is filled under a temporary name and renamed into place, so an interrupted
unpacking never leaves a half folder that looks finished. Only regular files are taken from the archive, by
their base name (no paths, links or devices): what comes out is a flat folder of presets.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import MoshiError, first_line
from ..places import voices_cache_dir
from ..voices import VoiceError, list_voices

__all__ = ["VoiceArchiveError", "ready_voices", "unpack_voices"]


class VoiceArchiveError(MoshiError):
    """The voices archive cannot be read; the message is one line."""


def _key(archive: Path) -> str:
    st = archive.stat()
    return hashlib.sha256(f"{archive.name}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


def unpack_voices(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the archive's preset files (unpacked the first time only)."""
    archive = Path(archive)
    root = Path(cache_dir) if cache_dir is not None else voices_cache_dir()
    folder = root / _key(archive)
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".voices-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar.getmembers():
                    name = os.path.basename(member.name)
                    if not member.isfile() or not name or name.startswith("."):
                        continue
                    source = tar.extractfile(member)
                    if source is None:
                        continue
                    with source, open(staging / name, "wb") as out:
                        shutil.copyfileobj(source, out)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise VoiceArchiveError(f"{archive}: not a readable voices archive ({first_line(e)})") from None
        if not any(staging.iterdir()):
            raise VoiceArchiveError(f"{archive}: the voices archive holds no files")
        try:
            staging.rename(folder)
        except OSError:  # another process unpacked it first
            if not folder.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def ready_voices(archive: str | os.PathLike, log: Callable[[str], None],
                 cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the archive's presets as the engine reads them (NAME.safetensors): unpacked, and its .pt
    presets converted the first time. Without torch, one line says the command that converts them once."""
    folder = unpack_voices(archive, cache_dir)
    if list_voices(folder) or not any(folder.glob("*.pt")):
        return folder
    from ..voice_presets import convert_voices

    try:
        convert_voices(folder, folder, log)
    except VoiceError as e:
        log(f"{first_line(e)}; the voice presets of {archive} are not usable until then: "
            f"python -m moshi_mlx.convert --voices {archive} --out {folder} (--voice takes a recording meanwhile)")
    return folder
