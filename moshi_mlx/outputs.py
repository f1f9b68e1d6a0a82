"""Safe output files: never overwrite an input, never leave a half-written file.

Two calls cover every tool that writes files (run_inference, convert, recordings):

* :func:`check_outputs` runs before any work (and before any model load). It refuses, with a
  one-line :class:`OutputError`, an output that is the same file as an input or as another output
  (symlinks and hard links included), an output that is a directory, a folder that is missing or
  not writable, and an existing output that is read-only. It returns the paths to write to.
* :func:`atomic_output` yields a temporary path in the destination's own folder; the file is moved
  into place (``os.replace``, atomic on one file system) only when the ``with`` block completes. An
  error or Ctrl-C deletes the temporary file, so the destination is either the old file, untouched,
  or the complete new one.

Example::

    out, = check_outputs(inputs=[src], outputs=[dst])
    with atomic_output(out) as tmp:
        write_everything_to(tmp)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MoshiError

PathLike = str | os.PathLike

__all__ = ["OutputError", "check_outputs", "atomic_output", "destination", "fresh_path", "fresh_paths", "probe_writable"]


class OutputError(MoshiError, ValueError):
    """An output that cannot be written safely; the message is one line naming the path."""


def destination(path: PathLike) -> Path:
    """Where writing ``path`` really lands: symlinks followed (a link to a file writes that file)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _same(a: Path, b: Path) -> bool:
    # realpath catches symlinks; samefile also catches hard links and case-insensitive names (macOS).
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_outputs(inputs: Iterable[PathLike | None], outputs: Iterable[PathLike | None]) -> list[Path]:
    """Check, before any work, that every output can be written without harming anything.

    ``None`` entries are skipped (optional outputs). Returns, for each non-``None`` output in order,
    the path to pass to :func:`atomic_output` (symlinks resolved). Raises :class:`OutputError`.
    """
    ins = [(p, destination(p)) for p in inputs if p is not None]
    outs = [(p, destination(p)) for p in outputs if p is not None]
    for i, (shown, real) in enumerate(outs):
        for in_shown, in_real in ins:
            if _same(real, in_real):
                raise OutputError(f"{shown}: is the input file {in_shown}; writing there would destroy it")
        for other_shown, other_real in outs[:i]:
            if _same(real, other_real):
                raise OutputError(f"{shown}: is also the output {other_shown}; give each output its own file")
        if real.is_dir():
            raise OutputError(f"{shown}: is a directory; give a file name")
        folder = real.parent
        if not folder.is_dir():
            raise OutputError(f"{shown}: folder {folder} does not exist")
        probe_writable(folder, shown)
        if real.exists() and not os.access(real, os.W_OK):
            raise OutputError(f"{shown}: exists and is read-only")
    return [real for _, real in outs]


def probe_writable(folder: Path, shown: PathLike) -> None:
    """Refuse (OutputError) a folder a file cannot be created in. A file is created for real: os.access
    says yes to root, and knows nothing of read-only mounts."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    except OSError as e:
        raise OutputError(f"{shown}: folder {folder} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: PathLike, suffix: str = "", overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file is hidden (``.NAME.XXXX.part``) and removed on any exception, Ctrl-C included.
    ``suffix`` is appended to the temporary name for writers that pick a format from the extension.
    With ``overwrite=False`` an existing ``path`` is never replaced: FileExistsError instead (the file
    is hard-linked into place, which is atomic and refuses to replace).
    """
    final = destination(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part" + suffix, dir=final.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e.strerror or e})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it what a plain open() would
        if overwrite:
            os.replace(tmp, final)
        else:
            _link_new(tmp, final)
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _link_new(tmp: Path, final: Path) -> None:
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: the check and the rename are then two steps
        if final.exists():
            raise FileExistsError(final) from None
        os.replace(tmp, final)


def fresh_paths(folder: PathLike, stem: str, suffixes: Iterable[str], when: float | None = None) -> list[Path]:
    """Names nobody uses yet in ``folder``, one per suffix, sharing ``STEM-YYYYmmdd-HHMMSS``, then
    ``...-2``, ``-3``, ... until none of the group exists (a recording's files belong together).

    Only a proposal: write each with ``atomic_output(path, overwrite=False)``, which refuses a file that
    appeared meanwhile, and ask again if one does.
    """
    suffixes = list(suffixes)
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}"
    for n in itertools.count(1):
        name = base if n == 1 else f"{base}-{n}"
        paths = [Path(folder) / f"{name}{suffix}" for suffix in suffixes]
        if not any(os.path.lexists(p) for p in paths):
            return paths
    raise AssertionError("unreachable")


def fresh_path(folder: PathLike, stem: str, suffix: str, when: float | None = None) -> Path:
    """One fresh name (see :func:`fresh_paths`): ``STEM-YYYYmmdd-HHMMSS.SUFFIX``, then ``...-2``, ..."""
    return fresh_paths(folder, stem, [suffix], when)[0]
