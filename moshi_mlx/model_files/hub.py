"""Find every file the app needs: Moshi LM weights, Mimi weights, text tokenizer, LM config.

Files come from the Hugging Face hub (through `huggingface_hub`, its cache, `HF_HOME`, `HF_ENDPOINT`
and `HF_HUB_OFFLINE`) or from local paths given on the command line. Whatever goes wrong ends in a
`HubError` whose message is one line naming what could not be had and the flag that provides it.

This module only finds files. What is *in* them (checkpoint kind, quantization, layout) is `checkpoint.py`'s
job, which reads each header once; the hub uses file names (and the repo's listing) to pick the right
weights before any large download, and reads one header only where `-q` meets a float file whose repo name
does not say its layout (PyTorch layout takes -q at load; MLX bf16 is refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..errors import MoshiError, first_line
from . import personaplex
from .source import FILE_FIELDS, FLAGS, ModelSource

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


@dataclass(frozen=True)
class KnownRepo:
    """What is published about a repo that its config.json may not say."""

    model_type: str  # Kyutai's model_type: "hibiki" for the translation models
    bf16_only: bool  # no q4/q8 file: -q 4/8 quantizes the bf16 checkpoint at load time
    reads_config: bool = True  # False: the repo's config.json is not an LM config (the LM's is known here)
    voices: str | None = None  # an archive of voice presets in the repo (PersonaPlex's voices.tgz)


#: Kyutai's Hibiki (French -> English speech translation) repos, published in bf16 only. Their config.json names
#: each file (moshi_name, mimi_name, tokenizer_name), e.g. hibiki-mlx-dc2cf5a5@80.safetensors,
#: mimi-dbaa9758@125.safetensors and tokenizer_spm_48k_multi6_2.model for the 1B; 2B reads and writes
#: 16 codebooks per stream (kyutai-labs/moshi configs/moshi_mlx_2b.json), the 1B 8.
KNOWN_REPOS: dict[str, KnownRepo] = {
    "kyutai/hibiki-1b-mlx-bf16": KnownRepo("hibiki", bf16_only=True),
    "kyutai/hibiki-2b-mlx-bf16": KnownRepo("hibiki", bf16_only=True),
    # Moshi 7B's LM config and file names; PyTorch layout with 16 depformer steps (see personaplex.py)
    personaplex.REPO: KnownRepo(personaplex.MODEL_TYPE, bf16_only=True, reads_config=False, voices=personaplex.VOICES_ARCHIVE),
}


#: How Kyutai names the repos of its PyTorch and Rust (candle) servers, e.g. kyutai/stt-1b-en_fr-candle,
#: kyutai/moshiko-pytorch-bf16: float weights in PyTorch's layout, which loading maps to ours in memory.
_PYTORCH_LAYOUT_REPO = re.compile(r"-(candle|pytorch)(-|$)")


def pytorch_layout_repo(repo: str | None) -> bool:
    """The repo's name says its weights are in PyTorch's layout (float: -q can only mean quantizing them at load)."""
    return bool(repo) and _PYTORCH_LAYOUT_REPO.search(repo.rsplit("/", 1)[-1]) is not None  # type: ignore[union-attr]


def quantizes_at_load(repo: str | None) -> bool:
    """-q 4/8 on this repo quantizes its float weights while loading: it publishes no quantized file (Hibiki's
    bf16-only repos) or its weights are in PyTorch's layout (the `-candle` and `-pytorch` repos)."""
    known = KNOWN_REPOS.get(repo or "")
    return (known is not None and known.bf16_only) or pytorch_layout_repo(repo)
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
CONFIG_NAME = "config.json"
_DEFAULT_NAMES = frozenset({*MOSHI_NAMES.values(), MIMI_NAME, TOKENIZER_NAME, CONFIG_NAME})

#: Ends every "could not be had" line: the way to see the app work with no download at all.
DEMO_HINT = "or try --demo (a tiny random model, no download)"

# Seconds to wait for the hub to answer before treating it as unreachable (falls back to the cache).
TIMEOUT_ENV = "MOSHI_MLX_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 5.0


class HubError(MoshiError, RuntimeError):
    """A model file could not be found or fetched; the message is one line meant for the user."""


@dataclass
class ModelFiles:
    moshi: Path
    mimi: Path
    tokenizer: Path
    lm_config: dict | None
    repo: str | None
    origins: dict[str, str]  # kind -> how to name the file in messages ("--mimi-weights X", "repo/name")
    voices: Path | None = None  # the repo's voice presets archive (PersonaPlex), when it has one
    voices_note: str | None = None  # why a repo that has presets gave none (one line, said at load)


# ---------------------------------------------------------------------------------------------------------
# local files given on the command line


def check_local_path(kind: str, path: str | os.PathLike) -> Path:
    """A local file given by flag: exists, is a file, is readable, is not empty."""
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


def read_local_config(p: Path, origin: str | None = None) -> dict:
    where = origin or f"{FLAGS['lm_config']} {p}"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HubError(f"{where}: not a JSON file") from None
    except json.JSONDecodeError as e:
        raise HubError(f"{where}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise HubError(f"{where}: expected a JSON object with the LM config keys (dim, num_heads, ...)")
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
        return self.not_cached({kind: filename} if filename else {}, kind)

    def not_cached(self, missing: dict[str, str], kind: str = "moshi") -> HubError:
        """Not cached and no hub, for every file of `missing` (kind -> name) at once: the repo, why, the flags."""
        it = "them" if len(missing) > 1 else "it"
        if self.offline_reason == "HF_HUB_OFFLINE is set":
            how = f"unset HF_HUB_OFFLINE to download {it}"
        else:
            how = f"connect to the internet to download {it}"
        names = list(missing.values())
        if not names:
            what = "nothing of this repo is"
        else:
            what = f"{' and '.join(names)} {'are' if len(names) > 1 else 'is'} not"
        flags = " and ".join(f"{FLAGS[k]} PATH" for k in (missing or {kind: ""}))
        return HubError(
            f"{self.label}: {what} in the Hugging Face cache ({self.cache_dir}) and "
            f"{self.offline_reason}; {how}, or pass {flags}; {DEMO_HINT}"
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

    def _cached_files(self, candidates: set[str] | None = None) -> set[str] | None:
        """Which of the files we could want are in the local cache for this revision (None: none)."""
        from huggingface_hub import try_to_load_from_cache

        names = candidates or _DEFAULT_NAMES
        found = set()
        for name in names:
            hit = try_to_load_from_cache(self.repo_id, name, cache_dir=self.cache_dir, revision=self.revision)
            if isinstance(hit, str):
                found.add(name)
        return found or None

    def _raise_known(self, e: Exception, filename: str | None, kind: str | None) -> None:
        """Turn the hub's errors that have a definite meaning into one-line HubErrors."""
        from huggingface_hub import utils as hf_utils

        if isinstance(e, hf_utils.RevisionNotFoundError):
            raise HubError(
                f"{self.repo_id}: revision {self.revision!r} not found on the hub (check --revision)"
            ) from None
        if isinstance(e, hf_utils.GatedRepoError):
            how = personaplex.GATED_HINT.format(repo=self.repo_id)
            raise HubError(f"{self.repo_id}: gated repo: {how}; or pass the files locally") from None
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
                    f"in the Hugging Face cache ({self.cache_dir}); pass {FLAGS[kind]} PATH, {DEMO_HINT}"
                ) from None
            raise self._unavailable(filename, kind) from None
        except Exception as e:
            self._raise_known(e, filename, kind)
            raise HubError(
                f"{self.label}: could not get {filename} ({first_line(e)}); pass {FLAGS[kind]} PATH, {DEMO_HINT}"
            ) from None
        return Path(path)


def _bits_from_name(name: str) -> int | None | str:
    """4 / 8 / None for the standard file names; "?" when the name does not say."""
    for bits, n in MOSHI_NAMES.items():
        if name == n:
            return bits
    m = re.search(r"\.q(4|8)\.safetensors$", name)
    if m:
        return int(m.group(1))
    return "?"


def _bits_from_repo_name(repo_id: str) -> int | None | str:
    """4 / 8 / None by the published repos' naming (``...-mlx-q4``, ``-q8``, ``-bf16``); "?" when it does not say."""
    m = re.search(r"-(q4|q8|bf16)$", repo_id)
    return "?" if m is None else {"q4": 4, "q8": 8, "bf16": None}[m.group(1)]


def _refuse_by_repo_name(repo: _Repo, quantize: int | None) -> None:
    """Offline, with no listing: a -q the repo's own name contradicts is said as such (no download would help)."""
    bits = _bits_from_repo_name(repo.repo_id)
    if quantize is not None and bits != "?" and bits != quantize:
        raise HubError(
            f"{repo.label} holds {describe_bits(bits)} weights (by its name), so it has no "  # type: ignore[arg-type]
            f"{MOSHI_NAMES[quantize]}: {quantize_hint(bits)}, or choose another --hf-repo"  # type: ignore[arg-type]
        )


def describe_bits(bits: int | None) -> str:
    return "bf16" if bits is None else f"{bits}-bit"


def quantize_hint(bits: int | None) -> str:
    """What to pass instead, for weights of `bits` (None: unquantized)."""
    return "drop -q" if bits is None else f"use -q {bits} (or drop -q)"


def _header_names(repo: _Repo, name: str) -> set[str] | None:
    """The tensor names in a safetensors file's header, from the cache or a ranged read of the hub (the header's
    kilobytes, not the file); None when neither answers."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = try_to_load_from_cache(repo.repo_id, name, cache_dir=repo.cache_dir, revision=repo.revision)
    try:
        if isinstance(cached, str):
            with open(cached, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            return set(header) - {"__metadata__"}
        if repo.offline_reason is None:
            meta = HfApi(endpoint=repo.endpoint).parse_safetensors_file_metadata(
                repo.repo_id, name, revision=repo.revision, timeout=_timeout())
            return set(meta.tensors)
    except Exception:  # unreadable or not a safetensors file: the caller's refusal stands
        return None
    return None


#: Given a float file's tensor names, whether -q may quantize it at load (PyTorch layout): the loader's
#: judgement (checkpoint.py), handed in so this module reads no checkpoint itself.
TakesQ = Callable[[set[str]], bool]


def _takes_q_at_load(repo: _Repo, name: str, takes_q: TakesQ | None) -> bool:
    """A float weights file whose repo name does not say its layout: its header does (the file plan's last word
    before the download), so -q on a PyTorch-layout file quantizes it at load instead of being refused."""
    if takes_q is None:
        return False
    names = _header_names(repo, name)
    return names is not None and takes_q(names)


def _pick_moshi_name(
    repo: _Repo, files: set[str] | None, quantize: int | None, config: dict, takes_q: TakesQ | None = None
) -> str:
    if quantizes_at_load(repo.repo_id):
        quantize = None  # the float file, quantized while loading
    named = config.get("moshi_name")
    if named:
        bits = _bits_from_name(named)
        if quantize is not None and bits is None and _takes_q_at_load(repo, named, takes_q):
            return named  # float, PyTorch layout: -q applies at load
        if quantize is not None and bits != "?" and bits != quantize:
            raise HubError(
                f"{repo.label} provides {named} ({describe_bits(bits)}), not {quantize}-bit weights: "
                f"{quantize_hint(bits)}, or choose another --hf-repo"
            )
        return named
    if files is None:  # offline with nothing cached for this revision
        _refuse_by_repo_name(repo, quantize)
        if quantize is not None:
            return MOSHI_NAMES[quantize]  # fails on the expected name, with the flag to use instead
        raise repo._unavailable(None, "moshi")
    present = [n for n in MOSHI_NAMES.values() if n in files]
    if quantize is not None:
        want = MOSHI_NAMES[quantize]
        if want in files:
            return want
        if present == [MOSHI_NAMES[None]] and _takes_q_at_load(repo, present[0], takes_q):
            return present[0]  # float, PyTorch layout: -q applies at load
        if present:
            bits = _bits_from_name(present[0])
            where = "caches" if repo.offline_reason else "provides"
            raise HubError(
                f"{repo.label} {where} {present[0]} ({describe_bits(bits)}), not {want}: "  # type: ignore[arg-type]
                f"{quantize_hint(bits)}, or choose another --hf-repo"  # type: ignore[arg-type]
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
        _refuse_by_repo_name(repo, quantize)
        raise repo._unavailable(want, "moshi")
    raise HubError(f"{repo.label} has no Moshi weights ({want}); check --hf-repo or pass --moshi-weights PATH")


def find_model_files(
    source: ModelSource, local_bits: int | None = None, progress: bool = True, takes_q: TakesQ | None = None
) -> ModelFiles:
    """Find the LM weights, Mimi weights, text tokenizer and LM config (paths only; contents are loading's job).

    `takes_q(tensor_names)`: whether a float file's header shows weights that -q quantizes at load (consulted
    only where -q meets a float file whose repo name does not say its layout).

    Local paths must exist and be readable. Anything not given locally comes from `source.hf_repo`
    (default: the Moshiko repo for `quantize`, or for `local_bits`, the bits of local LM weights) at
    `source.revision`. The weights file is chosen by name from the repo's listing, so a `-q` the repo
    cannot honour is refused before any large download.
    """
    quantize = source.quantize
    if quantize not in (None, 4, 8):
        raise HubError(f"-q/--quantize must be 4 or 8 (or absent for bf16), got {quantize!r}")

    # 1. Local files, checked up front before any network access.
    local = {kind: check_local_path(kind, getattr(source, field)) for kind, field in FILE_FIELDS.items()
             if kind != "lm_config" and getattr(source, field) is not None}
    origins = {kind: f"{FLAGS[kind]} {path}" for kind, path in local.items()}
    config: dict | None = None
    if isinstance(source.lm_config, dict):
        config = dict(source.lm_config)
    elif source.lm_config is not None:
        config = read_local_config(check_local_path("lm_config", source.lm_config))

    # 2. Everything else from the hub.
    if len(local) == 3 and source.hf_repo is None:
        return ModelFiles(local["moshi"], local["mimi"], local["tokenizer"], config, None, origins)

    if source.hf_repo is None:
        repo_id = DEFAULT_REPOS[quantize if quantize is not None else local_bits]
    else:
        repo_id = source.hf_repo.strip()
        if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", repo_id):
            raise HubError(f"--hf-repo {source.hf_repo!r}: expected a hub repo id like kyutai/moshiko-mlx-q4")

    with _progress_bars(progress):
        repo = _Repo(repo_id, source.revision)
        files = repo.list_files()

        repo_config: dict = {}
        known = KNOWN_REPOS.get(repo_id)
        reads_config = known is None or known.reads_config
        if reads_config and files is not None and CONFIG_NAME in files:
            repo_config = read_local_config(repo.download(CONFIG_NAME, "lm_config"), origin=f"{repo.label}/{CONFIG_NAME}")
        if config is None and repo_config:
            config = repo_config
        if repo.offline_reason is not None and repo_config:  # names the config gives may be cached too
            named = {str(repo_config[k]) for k in ("moshi_name", "mimi_name", "tokenizer_name") if repo_config.get(k)}
            files = repo._cached_files({*_DEFAULT_NAMES, *named})

        # Decide every name and check it against the listing before the (large) downloads start.
        needed: dict[str, str] = {}
        if "moshi" not in local:
            needed["moshi"] = _pick_moshi_name(repo, files, quantize, repo_config, takes_q)
        if "mimi" not in local:
            needed["mimi"] = str(repo_config.get("mimi_name") or MIMI_NAME)
        if "tokenizer" not in local:
            needed["tokenizer"] = str(repo_config.get("tokenizer_name") or TOKENIZER_NAME)
        # Every missing file in one line (Mimi and the tokenizer together), not one per run.
        if repo.offline_reason is not None:
            missing = {kind: name for kind, name in needed.items() if files is None or name not in files}
            if missing:
                raise repo.not_cached(missing)
        for kind, name in needed.items():
            if files is not None and name not in files:
                raise HubError(f"{repo.label} has no file {name}; pass {FLAGS[kind]} PATH")
        for kind, name in needed.items():
            local[kind] = repo.download(name, kind)
            origins[kind] = f"{repo.label}/{name}"
        voices, voices_note = _voices_archive(repo, files, known)

    return ModelFiles(local["moshi"], local["mimi"], local["tokenizer"], config, repo_id, origins, voices, voices_note)


def _voices_archive(repo: _Repo, files: set[str] | None, known: KnownRepo | None) -> tuple[Path | None, str | None]:
    """The repo's voice presets archive, or None and why: a model without its presets still runs (with a WAV
    voice or none), so a missing archive is said once at load, not fatal."""
    if known is None or known.voices is None:
        return None, None
    name = known.voices
    if repo.offline_reason is not None:
        files = repo._cached_files({name})
    if files is None or name not in files:
        why = repo.offline_reason or "the repo does not list it"
        return None, f"{repo.label}/{name} not available ({why}): no preset voices; --voice takes a WAV file"
    try:
        return repo.download(name, "moshi"), None
    except HubError as e:
        return None, f"no preset voices: {e}"


# ---------------------------------------------------------------------------------------------------------
# command line
