"""Find every file the app needs: Moshi LM weights, Mimi weights, text tokenizer, LM config.

Files come from the Hugging Face hub (through `huggingface_hub`, its cache, `HF_HOME`, `HF_ENDPOINT`
and `HF_HUB_OFFLINE`) or from local paths given on the command line. Whatever goes wrong ends in a
`HubError` whose message is one line naming what could not be had and the flag that provides it.

The LM's quantization is read from the checkpoint itself, never assumed from `-q` or the repo name, so
`-q` and `--hf-repo` cannot silently disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import first_line
from .loading import SafetensorsHeader, read_safetensors_header

__all__ = [
    "HubError",
    "ModelFiles",
    "resolve_model_files",
    "add_model_args",
    "model_files_from_args",
    "read_safetensors_header",
    "SafetensorsHeader",
    "checkpoint_bits",
    "DEFAULT_REPOS",
    "MOSHI_NAMES",
    "MIMI_NAME",
    "TOKENIZER_NAME",
]

DEFAULT_REPOS: dict[int | None, str] = {
    4: "kyutai/moshiko-mlx-q4",
    8: "kyutai/moshiko-mlx-q8",
    None: "kyutai/moshiko-mlx-bf16",
}
MOSHI_NAMES: dict[int | None, str] = {
    4: "model.q4.safetensors",
    8: "model.q8.safetensors",
    None: "model.safetensors",
}
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
CONFIG_NAME = "config.json"

# Seconds to wait for the hub to answer before treating it as unreachable (falls back to the cache).
TIMEOUT_ENV = "MOSHI_MLX_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 5.0

FLAGS = {
    "moshi": "--moshi-weights",
    "mimi": "--mimi-weights",
    "tokenizer": "--tokenizer",
    "lm_config": "--lm-config",
}


class HubError(RuntimeError):
    """A model file could not be resolved; the message is one line meant for the user."""


@dataclass
class ModelFiles:
    moshi: Path
    mimi: Path
    tokenizer: Path
    lm_config: dict | None
    repo: str | None
    quantize: int | None


def checkpoint_bits(tensors: dict[str, dict[str, Any]]) -> int | None:
    """Quantization bits of an MLX Moshi LM checkpoint from its header alone (None = unquantized)."""
    if "text_linear.scales" not in tensors:
        return None
    if "out_norm.weight" not in tensors or "text_linear.weight" not in tensors:
        raise ValueError("cannot tell the quantization: out_norm.weight or text_linear.weight is missing")
    packed = tensors["text_linear.weight"]["shape"][-1]
    dim = tensors["out_norm.weight"]["shape"][-1]
    bits = packed * 32 // dim
    if bits * dim != packed * 32:
        raise ValueError("cannot tell the quantization from text_linear.weight")
    return bits


# ---------------------------------------------------------------------------------------------------------
# local files given on the command line


def _check_path(kind: str, path: str | os.PathLike) -> Path:
    flag = FLAGS[kind]
    p = Path(path).expanduser()
    if not p.exists():
        raise HubError(f"{flag} {p}: no such file")
    if p.is_dir():
        raise HubError(f"{flag} {p}: is a directory, expected a file")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise HubError(f"{flag} {p}: cannot be read ({e.strerror or first_line(e)})") from None
    if p.stat().st_size == 0:
        raise HubError(f"{flag} {p}: file is empty")
    return p


def _check_moshi_file(p: Path, origin: str | None = None) -> int | None:
    """Validate an MLX Moshi LM checkpoint; returns its quantization bits."""
    where = origin or f"{FLAGS['moshi']} {p}"
    try:
        header = read_safetensors_header(p)
    except ValueError as e:
        raise HubError(f"{where}: {e}") from None
    names = header.tensors
    if "text_emb.weight" in names and "emb.0.weight" in names and "audio_embs.0.weight" not in names:
        raise HubError(
            f"{where}: this is a PyTorch-layout Moshi checkpoint; convert it first with "
            f"`python -m moshi_mlx.convert {p} OUT_DIR` and pass OUT_DIR/model.safetensors"
        )
    if "text_emb.weight" not in names or "text_linear.weight" not in names:
        hint = " (it looks like Mimi weights: use --mimi-weights)" if _looks_like_mimi(names) else ""
        raise HubError(f"{where}: not a Moshi LM checkpoint (no text_emb/text_linear tensors){hint}")
    try:
        return checkpoint_bits(names)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise HubError(f"{where}: {first_line(e)}") from None


def _looks_like_mimi(names: dict[str, Any]) -> bool:
    return any(k.startswith("encoder.") for k in names) and any(k.startswith("quantizer.") for k in names)


def _check_mimi_file(p: Path, origin: str | None = None) -> None:
    where = origin or f"{FLAGS['mimi']} {p}"
    try:
        header = read_safetensors_header(p)
    except ValueError as e:
        raise HubError(f"{where}: {e}") from None
    if not _looks_like_mimi(header.tensors):
        hint = " (it looks like Moshi LM weights: use --moshi-weights)" if "text_emb.weight" in header.tensors else ""
        raise HubError(f"{where}: not Mimi codec weights (no encoder./quantizer. tensors){hint}")


def _check_tokenizer_file(p: Path, origin: str | None = None) -> None:
    where = origin or f"{FLAGS['tokenizer']} {p}"
    try:
        import sentencepiece
    except ImportError:  # pragma: no cover - sentencepiece is a dependency
        return
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(p))
        ok = sp.get_piece_size() > 0
    except Exception:
        ok = False
    if not ok:
        raise HubError(f"{where}: not a SentencePiece model (the text tokenizer, e.g. {TOKENIZER_NAME})")


def _read_config(p: Path, origin: str | None = None) -> dict:
    where = origin or f"{FLAGS['lm_config']} {p}"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HubError(f"{where}: not a JSON file") from None
    except json.JSONDecodeError as e:
        raise HubError(f"{where}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise HubError(f"{where}: expected a JSON object with the LM config keys (dim, num_heads, ...)")
    try:
        from .models.config import LmConfig
    except ImportError:  # pragma: no cover
        return data
    try:
        LmConfig.from_dict(data)
    except Exception as e:
        raise HubError(f"{where}: not a usable LM config ({first_line(e)})") from None
    return data


# ---------------------------------------------------------------------------------------------------------
# the hub


def _timeout() -> float:
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from huggingface_hub import utils as hf_utils

    if enabled or hf_utils.are_progress_bars_disabled():
        yield
        return
    hf_utils.disable_progress_bars()
    try:
        yield
    finally:
        hf_utils.enable_progress_bars()


class _Repo:
    """One hub repo at one revision, online when the hub answers, else from the local cache."""

    def __init__(self, repo_id: str, revision: str | None) -> None:
        from huggingface_hub import constants

        self.repo_id = repo_id
        self.revision = revision
        self.endpoint = constants.ENDPOINT
        is_offline = getattr(constants, "is_offline_mode", None)
        self.offline_reason: str | None = None
        if is_offline() if is_offline is not None else constants.HF_HUB_OFFLINE:
            self.offline_reason = "HF_HUB_OFFLINE is set"
        else:
            problem = self._probe()
            if problem is not None:
                self.offline_reason = f"cannot reach {self.endpoint} ({problem})"

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    @property
    def cache_dir(self) -> str:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)

    def _probe(self) -> str | None:
        """One short request to the endpoint so an unreachable hub costs seconds, not retries."""
        from huggingface_hub.utils import get_session

        try:
            get_session().head(self.endpoint, timeout=_timeout())
        except Exception as e:  # any answer at all means the hub is reachable
            return first_line(e) or e.__class__.__name__
        return None

    def _unavailable(self, filename: str | None, kind: str) -> HubError:
        """Not cached and no hub: say which repo/file, why, and which flag gives it locally."""
        if self.offline_reason == "HF_HUB_OFFLINE is set":
            how = "unset HF_HUB_OFFLINE to download it"
        else:
            how = "connect to the internet to download it"
        what = f"{filename} is not" if filename else "nothing of this repo is"
        return HubError(
            f"{self.label}: {what} in the Hugging Face cache ({self.cache_dir}) and "
            f"{self.offline_reason}; {how}, or pass {FLAGS[kind]} PATH"
        )

    def list_files(self) -> set[str] | None:
        """Files in the repo (online), or the files cached for this revision (offline; None: nothing cached)."""
        if self.offline_reason is None:
            from huggingface_hub import HfApi

            try:
                return set(HfApi(endpoint=self.endpoint).list_repo_files(self.repo_id, revision=self.revision))
            except Exception as e:
                self._raise_known(e, None, None)
                self.offline_reason = f"cannot list {self.repo_id} on {self.endpoint} ({first_line(e)})"
        return self._cached_files()

    def _cached_files(self) -> set[str] | None:
        from huggingface_hub.file_download import repo_folder_name

        storage = Path(self.cache_dir) / repo_folder_name(repo_id=self.repo_id, repo_type="model")
        rev = self.revision or "main"
        if re.fullmatch(r"[0-9a-f]{40}", rev):
            commit = rev
        else:
            ref = storage / "refs" / rev
            if not ref.is_file():
                return None
            commit = ref.read_text().strip()
        snapshot = storage / "snapshots" / commit
        if not snapshot.is_dir():
            return None
        return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}

    def _raise_known(self, e: Exception, filename: str | None, kind: str | None) -> None:
        """Turn the hub's errors that have a definite meaning into one-line HubErrors."""
        from huggingface_hub import utils as hf_utils

        if isinstance(e, hf_utils.RevisionNotFoundError):
            raise HubError(
                f"{self.repo_id}: revision {self.revision!r} not found on the hub (check --revision)"
            ) from None
        if isinstance(e, hf_utils.GatedRepoError):
            raise HubError(
                f"{self.repo_id}: gated repo; accept its terms on the hub and log in (`hf auth login`), "
                f"or pass the files locally"
            ) from None
        if isinstance(e, hf_utils.RepositoryNotFoundError):
            raise HubError(
                f"{self.repo_id}: repository not found on {self.endpoint} (check --hf-repo; private repos need a login)"
            ) from None
        if (
            filename is not None
            and kind is not None
            and isinstance(e, hf_utils.EntryNotFoundError)
            and not isinstance(e, hf_utils.LocalEntryNotFoundError)
        ):
            raise HubError(f"{self.label} has no file {filename}; pass {FLAGS[kind]} PATH") from None

    def download(self, filename: str, kind: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import utils as hf_utils

        try:
            path = hf_hub_download(
                self.repo_id,
                filename,
                revision=self.revision,
                local_files_only=self.offline_reason is not None,
                etag_timeout=_timeout(),
                endpoint=self.endpoint,
            )
        except (hf_utils.LocalEntryNotFoundError, hf_utils.OfflineModeIsEnabled) as e:
            if self.offline_reason is None:  # the hub answered the probe but not this request
                cause = e.__cause__ or e
                raise HubError(
                    f"{self.label}: could not get {filename} from {self.endpoint} ({first_line(cause)}) and it is not "
                    f"in the Hugging Face cache ({self.cache_dir}); pass {FLAGS[kind]} PATH"
                ) from None
            raise self._unavailable(filename, kind) from None
        except Exception as e:
            self._raise_known(e, filename, kind)
            raise HubError(
                f"{self.label}: could not get {filename} ({first_line(e)}); pass {FLAGS[kind]} PATH"
            ) from None
        return Path(path)

    def cached(self, filename: str) -> bool:
        files = self._cached_files()
        return files is not None and filename in files


def _bits_from_name(name: str) -> int | None | str:
    """4 / 8 / None for the standard file names; "?" when the name does not say."""
    for bits, n in MOSHI_NAMES.items():
        if name == n:
            return bits
    m = re.search(r"\.q(4|8)\.safetensors$", name)
    if m:
        return int(m.group(1))
    return "?"


def _describe(bits: int | None) -> str:
    return "bf16" if bits is None else f"{bits}-bit"


def _q_hint(bits: int | None) -> str:
    return "drop -q" if bits is None else f"use -q {bits} (or drop -q)"


def _pick_moshi_name(repo: _Repo, files: set[str] | None, quantize: int | None, config: dict) -> str:
    named = config.get("moshi_name")
    if named:
        bits = _bits_from_name(named)
        if quantize is not None and bits != "?" and bits != quantize:
            raise HubError(
                f"{repo.label} provides {named} ({_describe(bits)}), not {quantize}-bit weights: "
                f"{_q_hint(bits)}, or choose another --hf-repo"
            )
        return named
    if files is None:  # offline with nothing cached for this revision
        if quantize is not None:
            return MOSHI_NAMES[quantize]  # fails on the expected name, with the flag to use instead
        raise repo._unavailable(None, "moshi")
    present = [n for n in MOSHI_NAMES.values() if n in files]
    if quantize is not None:
        want = MOSHI_NAMES[quantize]
        if want in files:
            return want
        if present:
            bits = _bits_from_name(present[0])
            where = "caches" if repo.offline_reason else "provides"
            raise HubError(
                f"{repo.label} {where} {present[0]} ({_describe(bits)}), not {want}: "  # type: ignore[arg-type]
                f"{_q_hint(bits)}, or choose another --hf-repo"  # type: ignore[arg-type]
            )
    elif len(present) == 1:
        return present[0]
    elif MOSHI_NAMES[None] in present:
        return MOSHI_NAMES[None]
    elif present:
        choices = " or ".join(f"-q {_bits_from_name(n)}" for n in present)
        raise HubError(f"{repo.label} holds several quantizations ({', '.join(present)}): pass {choices}")
    want = MOSHI_NAMES[quantize]
    if repo.offline_reason is not None:
        raise repo._unavailable(want, "moshi")
    raise HubError(f"{repo.label} has no Moshi weights ({want}); check --hf-repo or pass --moshi-weights PATH")


def resolve_model_files(
    quantize: int | None = None,
    hf_repo: str | None = None,
    revision: str | None = None,
    moshi_weights: str | os.PathLike | None = None,
    mimi_weights: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    lm_config: str | os.PathLike | dict | None = None,
    progress: bool = True,
) -> ModelFiles:
    """Resolve the LM weights, Mimi weights, text tokenizer and LM config.

    Local paths are checked first (exists, readable, non-empty, right kind of file). Anything not given
    locally comes from `hf_repo` (default: the Moshiko repo for `quantize`) at `revision`. The returned
    `quantize` is what the LM checkpoint holds; a `quantize` that disagrees with it is an error.
    """
    if quantize not in (None, 4, 8):
        raise HubError(f"-q/--quantize must be 4 or 8 (or absent for bf16), got {quantize!r}")

    # 1. Local files, checked up front before any network access.
    moshi_path = mimi_path = tok_path = None
    local_bits: int | None = None
    if moshi_weights is not None:
        moshi_path = _check_path("moshi", moshi_weights)
        local_bits = _check_moshi_file(moshi_path)
        if quantize is not None and local_bits != quantize:
            raise HubError(
                f"--moshi-weights {moshi_path} holds {_describe(local_bits)} weights but -q {quantize} was given: "
                f"{_q_hint(local_bits)}"
            )
    if mimi_weights is not None:
        mimi_path = _check_path("mimi", mimi_weights)
        _check_mimi_file(mimi_path)
    if tokenizer is not None:
        tok_path = _check_path("tokenizer", tokenizer)
        _check_tokenizer_file(tok_path)
    config: dict | None = None
    if isinstance(lm_config, dict):
        config = dict(lm_config)
    elif lm_config is not None:
        config = _read_config(_check_path("lm_config", lm_config))

    # 2. Everything else from the hub.
    if moshi_path is not None and mimi_path is not None and tok_path is not None and hf_repo is None:
        return ModelFiles(moshi_path, mimi_path, tok_path, config, None, _confirm_bits(moshi_path, local_bits, config))

    if hf_repo is None:
        repo_id = DEFAULT_REPOS[quantize if quantize is not None else local_bits]
    else:
        repo_id = hf_repo.strip()
        if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", repo_id):
            raise HubError(f"--hf-repo {hf_repo!r}: expected a hub repo id like kyutai/moshiko-mlx-q4")

    with _progress_bars(progress):
        repo = _Repo(repo_id, revision)
        files = repo.list_files()

        repo_config: dict = {}
        if files is not None and CONFIG_NAME in files:
            repo_config = _read_config(repo.download(CONFIG_NAME, "lm_config"), origin=f"{repo.label}/{CONFIG_NAME}")
        if config is None and repo_config:
            config = repo_config

        # Decide every name and check it against the listing before the (large) downloads start.
        needed: dict[str, str] = {}
        if moshi_path is None:
            needed["moshi"] = _pick_moshi_name(repo, files, quantize, repo_config)
        if mimi_path is None:
            needed["mimi"] = str(repo_config.get("mimi_name") or MIMI_NAME)
        if tok_path is None:
            needed["tokenizer"] = str(repo_config.get("tokenizer_name") or TOKENIZER_NAME)
        for kind, name in needed.items():
            if files is not None and name not in files:
                if repo.offline_reason is not None:
                    raise repo._unavailable(name, kind)
                raise HubError(f"{repo.label} has no file {name}; pass {FLAGS[kind]} PATH")

        if moshi_path is None:
            name = needed["moshi"]
            moshi_path = repo.download(name, "moshi")
            bits = _check_moshi_file(moshi_path, origin=f"{repo.label}/{name}")
            if quantize is not None and bits != quantize:
                raise HubError(
                    f"{repo.label}/{name} holds {_describe(bits)} weights, not {quantize}-bit: {_q_hint(bits)}"
                )
            local_bits = bits
        if mimi_path is None:
            name = needed["mimi"]
            mimi_path = repo.download(name, "mimi")
            _check_mimi_file(mimi_path, origin=f"{repo.label}/{name}")
        if tok_path is None:
            name = needed["tokenizer"]
            tok_path = repo.download(name, "tokenizer")
            _check_tokenizer_file(tok_path, origin=f"{repo.label}/{name}")

    bits = _confirm_bits(moshi_path, local_bits, config)
    return ModelFiles(moshi_path, mimi_path, tok_path, config, repo_id, bits)


def _confirm_bits(path: Path, bits: int | None, config: dict | None) -> int | None:
    """Cross-check the header-derived bits with the loader's own inspection (WeightsError propagates)."""
    try:
        from .loading import inspect_checkpoint
        from .models.config import LmConfig
    except ImportError:  # pragma: no cover - loader unavailable
        return bits
    info = inspect_checkpoint(path, LmConfig.from_dict(config) if config else None)
    found = info.quantization.bits if info.quantization is not None else None
    if found != bits:
        raise HubError(f"{path}: quantization unclear ({_describe(bits)} by header, {_describe(found)} by loader)")
    return found


# ---------------------------------------------------------------------------------------------------------
# command line


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model-file flags shared by every entry point."""
    g = parser.add_argument_group("model files")
    g.add_argument(
        "-q", "--quantize", type=int, choices=[4, 8], default=None,
        help="use 4- or 8-bit weights (default repo kyutai/moshiko-mlx-q4 / -q8); absent: bf16, or whatever "
        "--hf-repo / --moshi-weights holds",
    )
    g.add_argument("--hf-repo", default=None, help="hub repo to take the files from, e.g. kyutai/moshika-mlx-q4")
    g.add_argument("--revision", default=None, help="pin the hub repo to a branch, tag or commit")
    g.add_argument("--moshi-weights", default=None, metavar="PATH", help="local MLX Moshi LM .safetensors")
    g.add_argument("--mimi-weights", default=None, metavar="PATH", help=f"local Mimi .safetensors ({MIMI_NAME})")
    g.add_argument("--tokenizer", default=None, metavar="PATH", help=f"local SentencePiece model ({TOKENIZER_NAME})")
    g.add_argument("--lm-config", default=None, metavar="PATH", help="local config.json describing the LM")
    return parser


def model_files_from_args(args: argparse.Namespace, progress: bool = True) -> ModelFiles:
    return resolve_model_files(
        quantize=args.quantize,
        hf_repo=args.hf_repo,
        revision=args.revision,
        moshi_weights=args.moshi_weights,
        mimi_weights=args.mimi_weights,
        tokenizer=args.tokenizer,
        lm_config=args.lm_config,
        progress=progress,
    )
