"""Every random stand-in weight, in one place: generated locally, nothing is downloaded.

* :func:`write_random_mimi` writes a Mimi codec checkpoint with random weights in the exact tensor
  layout of the published file (names, shapes and dtypes are derived here from Mimi's configuration),
  so ``rustymimi`` loads it and produces finite, noise-like audio.
* :func:`write_stand_in_tokenizer` trains a tiny SentencePiece model that has a piece for every text id.
* :func:`demo_assets` creates both once in a cache directory and reuses them afterwards.
* :func:`demo_lm` builds the tiny random LM of ``--demo``; :func:`write_random_lm` writes random LM weights
  of any config in the published layout (the benchmark's ``--config tiny|small|7b``).
* :func:`write_stand_in_repo` writes a whole repo as published (config.json naming its files, bf16 weights,
  Mimi, tokenizer), e.g. Hibiki's (:data:`HIBIKI_CONFIGS`, shrunk by :func:`tiny_hibiki_config`), and
  :func:`cache_stand_in_repo` puts it in a Hugging Face cache, so the app loads it offline like a download.

Files are written with `outputs.atomic_output` (a temporary name, renamed into place), so an interrupted run
never leaves a truncated file behind under the final name.
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..models.config import LmConfig, config_tiny
from ..models.lm import Lm
from ..outputs import atomic_output
from ..places import demo_dir
from .checkpoint import (
    GROUP_SIZE_FOR_BITS,
    Quantization,
    WeightsError,
    build_model,
    materialise,
    read_tensor_infos,
    save_lm,
)
from .hub import MIMI_NAME, MOSHI_NAMES, TOKENIZER_NAME
from .personaplex import MODEL_TYPE, PRESETS, VOICES_ARCHIVE, VOICES_FOLDER, LayoutDims, layout

__all__ = [
    "MIMI_CONFIG",
    "mimi_tensor_layout",
    "write_random_mimi",
    "is_valid_mimi_file",
    "is_current_stand_in",
    "is_valid_tokenizer_file",
    "write_stand_in_tokenizer",
    "DemoAssets",
    "demo_assets",
    "default_cache_dir",
    "demo_lm",
    "write_random_lm",
    "HIBIKI_CONFIGS",
    "HIBIKI_REPOS",
    "tiny_hibiki_config",
    "write_stand_in_repo",
    "cache_stand_in_repo",
]

# --------------------------------------------------------------------------------------------------
# Mimi layout
# --------------------------------------------------------------------------------------------------

#: The configuration of the published Mimi codec (the values rustymimi has built in).
MIMI_CONFIG = {
    "channels": 1,
    "seanet": {
        "dimension": 512,
        "n_filters": 64,
        "ratios": [8, 6, 5, 4],  # decoder order; the encoder walks them reversed
        "n_residual_layers": 1,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "compress": 2,
    },
    "transformer": {"d_model": 512, "num_layers": 8, "dim_feedforward": 2048},
    "quantizer": {"n_q": 32, "n_q_semantic": 1, "bins": 2048, "dimension": 256},
    "downsample_stride": 2,  # 25 Hz transformer rate -> 12.5 Hz token rate
}


def _conv(prefix: str, c_in: int, c_out: int, k: int, bias: bool = True):
    yield f"{prefix}.weight", (c_out, c_in, k)
    if bias:
        yield f"{prefix}.bias", (c_out,)


def _convtr(prefix: str, c_in: int, c_out: int, k: int, groups: int = 1, bias: bool = True):
    yield f"{prefix}.weight", (c_in, c_out // groups, k)
    if bias:
        yield f"{prefix}.bias", (c_out,)


def _resblock(prefix: str, dim: int, cfg: dict):
    hidden = dim // cfg["compress"]
    # block = [ELU, conv k=3 dim->hidden, ELU, conv k=1 hidden->dim]; only indices 1 and 3 carry weights
    yield from _conv(f"{prefix}.block.1.conv.conv", dim, hidden, cfg["residual_kernel_size"])
    yield from _conv(f"{prefix}.block.3.conv.conv", hidden, dim, 1)


def _seanet_encoder(cfg: dict, channels: int):
    nf, idx = cfg["n_filters"], 0
    yield from _conv(f"encoder.model.{idx}.conv.conv", channels, nf, cfg["kernel_size"])
    idx += 1
    mult = 1
    for ratio in reversed(cfg["ratios"]):
        for _ in range(cfg["n_residual_layers"]):
            yield from _resblock(f"encoder.model.{idx}", mult * nf, cfg)
            idx += 1
        idx += 1  # ELU
        yield from _conv(f"encoder.model.{idx}.conv.conv", mult * nf, 2 * mult * nf, 2 * ratio)
        idx += 1
        mult *= 2
    idx += 1  # ELU
    yield from _conv(f"encoder.model.{idx}.conv.conv", mult * nf, cfg["dimension"], cfg["last_kernel_size"])


def _seanet_decoder(cfg: dict, channels: int):
    nf, idx = cfg["n_filters"], 0
    mult = 2 ** len(cfg["ratios"])
    yield from _conv(f"decoder.model.{idx}.conv.conv", cfg["dimension"], mult * nf, cfg["kernel_size"])
    idx += 1
    for ratio in cfg["ratios"]:
        idx += 1  # ELU
        yield from _convtr(f"decoder.model.{idx}.convtr.convtr", mult * nf, mult * nf // 2, 2 * ratio)
        idx += 1
        for _ in range(cfg["n_residual_layers"]):
            yield from _resblock(f"decoder.model.{idx}", mult * nf // 2, cfg)
            idx += 1
        mult //= 2
    idx += 1  # ELU
    yield from _conv(f"decoder.model.{idx}.conv.conv", nf, channels, cfg["last_kernel_size"])


def _transformer(prefix: str, cfg: dict):
    d, ff = cfg["d_model"], cfg["dim_feedforward"]
    for i in range(cfg["num_layers"]):
        p = f"{prefix}.transformer.layers.{i}"
        yield f"{p}.self_attn.out_proj.weight", (d, d)
        yield f"{p}.self_attn.in_proj_weight", (3 * d, d)
        for norm in ("norm1", "norm2"):
            yield f"{p}.{norm}.weight", (d,)
            yield f"{p}.{norm}.bias", (d,)
        yield f"{p}.linear1.weight", (ff, d)
        yield f"{p}.linear2.weight", (d, ff)
        yield f"{p}.layer_scale_1.scale", (d,)
        yield f"{p}.layer_scale_2.scale", (d,)


def _rvq(prefix: str, n_q: int, d_model: int, cfg: dict):
    dim, bins = cfg["dimension"], cfg["bins"]
    yield f"{prefix}.input_proj.weight", (dim, d_model, 1)
    yield f"{prefix}.output_proj.weight", (d_model, dim, 1)
    for i in range(n_q):
        p = f"{prefix}.vq.layers.{i}._codebook"
        yield f"{p}._initialized", (1,)
        yield f"{p}.cluster_usage", (bins,)
        yield f"{p}.embedding_sum", (bins, dim)


def mimi_tensor_layout(config: dict = MIMI_CONFIG) -> dict[str, tuple[int, ...]]:
    """Names and shapes (all float32) of a Mimi checkpoint, in the published file's order."""
    seanet, tr, q = config["seanet"], config["transformer"], config["quantizer"]
    dim, k_res = seanet["dimension"], config["downsample_stride"]
    parts = [
        _seanet_encoder(seanet, config["channels"]),
        _seanet_decoder(seanet, config["channels"]),
        _transformer("encoder_transformer", tr),
        _transformer("decoder_transformer", tr),
        _rvq("quantizer.rvq_first", q["n_q_semantic"], dim, q),
        _rvq("quantizer.rvq_rest", q["n_q"] - q["n_q_semantic"], dim, q),
        # conv with kernel 2*stride, no bias; depthwise transposed conv for the way back up
        _conv("downsample.conv.conv.conv", dim, dim, 2 * k_res, bias=False),
        _convtr("upsample.convtr.convtr.convtr", dim, dim, 2 * k_res, groups=dim, bias=False),
    ]
    layout: dict[str, tuple[int, ...]] = {}
    for part in parts:
        for name, shape in part:
            assert name not in layout, name
            layout[name] = tuple(int(s) for s in shape)
    return layout


def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator, scale: float) -> np.ndarray:
    if name.endswith(("._initialized", ".cluster_usage")):
        return np.ones(shape, np.float32)  # codebook vector = embedding_sum / cluster_usage
    if name.endswith(".embedding_sum"):
        return rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(".scale"):  # layer scale
        return np.full(shape, 0.01, np.float32)
    if ".norm" in name:
        return (np.ones if name.endswith(".weight") else np.zeros)(shape, np.float32)
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32(scale / math.sqrt(max(fan_in, 1)))
    return w


#: Gain on the random decoder's last convolution (linear, no bias after it: the audio scales by this).
#: Unscaled, the babble peaks near -47 dBFS (RMS -61), which sounds like a broken speaker; x80 (+38 dB)
#: puts its peaks near -9 dBFS. Only the stand-in is scaled: real Mimi weights are never touched.
DECODER_OUTPUT_GAIN = 80.0
#: Written into the stand-in's metadata; a cached file of another version is regenerated.
#: 2: DECODER_OUTPUT_GAIN (version 1, unmarked, was the quiet one).
STAND_IN_VERSION = "2"


def _decoder_output_weight(layout: dict[str, tuple[int, ...]]) -> str:
    """The decoder's last convolution, the one that makes the waveform."""
    return [name for name in layout if name.startswith("decoder.model.") and name.endswith(".weight")][-1]


def write_random_mimi(path: str | os.PathLike, seed: int = 0, scale: float = 0.5) -> Path:
    """Write a random-weight Mimi checkpoint (~385 MB, float32) in the published layout to ``path``."""
    from safetensors.numpy import save_file

    path = Path(path)
    rng = np.random.default_rng(seed)
    layout = mimi_tensor_layout()
    tensors = {name: _random_tensor(name, shape, rng, scale) for name, shape in layout.items()}
    tensors[_decoder_output_weight(layout)] *= np.float32(DECODER_OUTPUT_GAIN)
    metadata = {"moshi_mlx": "random stand-in", "seed": str(seed), "version": STAND_IN_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def is_valid_mimi_file(path: str | os.PathLike) -> bool:
    """Cheap check (header only) that ``path`` is a complete safetensors file with Mimi's layout."""
    try:
        tensors, _ = read_tensor_infos(path)
    except WeightsError:
        return False
    return _has_mimi_layout(tensors)


def is_current_stand_in(path: str | os.PathLike) -> bool:
    """``path`` is a complete stand-in Mimi written by this version of :func:`write_random_mimi`."""
    try:
        tensors, metadata = read_tensor_infos(path)
    except WeightsError:
        return False
    return metadata.get("version") == STAND_IN_VERSION and _has_mimi_layout(tensors)


def _has_mimi_layout(tensors) -> bool:
    layout = mimi_tensor_layout()
    if set(tensors) != set(layout):
        return False
    return all(tensors[k].dtype == "F32" and tensors[k].shape == s for k, s in layout.items())


# --------------------------------------------------------------------------------------------------
# Text tokenizer
# --------------------------------------------------------------------------------------------------

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_NUM_SPECIALS = 4  # 0 <unk>, 1 <s>, 2 </s>, 3 <pad> (as in Moshi's tokenizer: text ids 0 and 3 are skipped)


def _made_up_words(n: int) -> list[str]:
    """``n`` distinct short pronounceable words, shortest first ("ba", "be", ..., "baba", ...)."""
    syll = [c + v for c in _CONSONANTS for v in _VOWELS]
    words: list[str] = []
    layer = [""]
    while len(words) < n:
        layer = [w + s for w in layer for s in syll]
        words.extend(layer[: n - len(words)])
    return words


def write_stand_in_tokenizer(path: str | os.PathLike, vocab_size: int = 32000) -> Path:
    """Train a small SentencePiece model with exactly ``vocab_size`` pieces, one for every id.

    Ids 0..3 are ``<unk>``, ``<s>``, ``</s>``, ``<pad>``; ids 0 (unknown) and 3 (padding) are the ones
    the app never prints, as with Moshi's real tokenizer. Every other id is a made-up word such as
    ``▁bako`` so that random text ids decode to readable gibberish. Takes a few seconds.
    """
    import sentencepiece as spm

    path = Path(path)
    # specials (4) + user symbols + the corpus's characters (which take the last ids) = vocab_size
    chars = sorted(set(_CONSONANTS + _VOWELS)) + ["\u2581"]
    n_user = vocab_size - _NUM_SPECIALS - len(chars)
    if n_user < 1:
        raise ValueError(f"vocab_size must be at least {_NUM_SPECIALS + len(chars) + 1}")
    words = _made_up_words(n_user + len(_CONSONANTS) * len(_VOWELS))
    # Symbols are words of 4+ letters; the 2-letter words appear only in the training corpus.
    symbols = ["\u2581" + w for w in words if len(w) > 2][:n_user]
    corpus = [" ".join(words[i : i + 12]) for i in range(0, min(len(words), 3000), 12)]
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmpdir:
        prefix = os.path.join(tmpdir, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_prefix=prefix,
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            user_defined_symbols=symbols,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
            character_coverage=1.0,
            num_threads=1,
            minloglevel=2,
        )
        model = Path(prefix + ".model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.get_piece_size() != vocab_size:
        raise RuntimeError(f"stand-in tokenizer has {sp.get_piece_size()} pieces, expected {vocab_size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_bytes(model)
    return path


def is_valid_tokenizer_file(path: str | os.PathLike, vocab_size: int = 32000) -> bool:
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        return sp.get_piece_size() == vocab_size and sp.pad_id() == 3 and sp.unk_id() == 0
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoAssets:
    mimi_path: Path
    tokenizer_path: Path


MIMI_FILE = "mimi-random.safetensors"
TOKENIZER_FILE = "tokenizer-stand-in.model"


def default_cache_dir() -> Path:
    """The demo's folder (moshi_mlx/places.py decides it: the platform's user cache, or $MOSHI_MLX_DEMO_DIR)."""
    return demo_dir()


def demo_assets(cache_dir: str | os.PathLike | None = None) -> DemoAssets:
    """Return the demo's stand-in files, creating them in ``cache_dir`` the first time (silently)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    mimi_path, tok_path = root / MIMI_FILE, root / TOKENIZER_FILE
    if not is_current_stand_in(mimi_path):  # missing, truncated, or an older (quieter) stand-in
        write_random_mimi(mimi_path)
    if not is_valid_tokenizer_file(tok_path):
        write_stand_in_tokenizer(tok_path)
    return DemoAssets(mimi_path=mimi_path, tokenizer_path=tok_path)


# --------------------------------------------------------------------------------------------------
# LM weights
# --------------------------------------------------------------------------------------------------


def demo_lm(seed: int = 0, config: LmConfig | None = None) -> Lm:
    """A tiny random-weight LM (nothing downloaded); the same seed gives the same weights."""
    mx.random.seed(seed)
    model = build_model(config or config_tiny(), None, mx.float32)
    mx.eval(model.parameters())
    return model


def write_random_lm(
    config: LmConfig, bits: int | None, folder: Path, seed: int = 0, progress: Callable[[int, int], None] | None = None
) -> tuple[Path, Path]:
    """Random weights in the published layout (bfloat16, or q8/q4 with bfloat16 scales) plus their config.json.

    Returns (weights, config) paths in `folder`.
    """
    mx.random.seed(seed)
    quant = Quantization(bits, GROUP_SIZE_FOR_BITS[bits]) if bits else None
    model = build_model(config, quant, mx.bfloat16)
    materialise(model, progress)  # layer by layer, so peak memory stays near the model's size
    weights = folder / MOSHI_NAMES[bits]  # the published names, as convert writes them
    save_lm(model, weights)
    del model
    gc.collect()
    mx.clear_cache()  # give the builder's memory back before whatever is timed next
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(config.to_dict()))
    return weights, config_path


# --------------------------------------------------------------------------------------------------
# Hibiki: stand-in repos in the published layouts
# --------------------------------------------------------------------------------------------------

_HIBIKI_CONDITIONER = {
    "description": {"type": "lut", "lut": {"n_bins": 31, "dim": 16, "tokenizer": "noop",
                                           "possible_values": ["very_bad", "bad", "neutral", "good", "very_good"]}}
}


def _hibiki_delays(codebooks_per_stream: int) -> list[int]:
    """Text 0; per stream its semantic codebook 0 and the acoustic ones 2 (the configs' delay vector)."""
    stream = [0] + [2] * (codebooks_per_stream - 1)
    return [0, *stream, *stream]


def _hibiki_config(dim: int, heads: int, layers: int, context: int, per_stream: int, dep_ff: int) -> dict:
    return {
        "dim": dim, "text_card": 48000, "existing_text_padding_id": 3, "n_q": 2 * per_stream, "dep_q": per_stream,
        "card": 2048, "num_heads": heads, "num_layers": layers, "hidden_scale": 4.125, "causal": True,
        "layer_scale": None, "context": context, "max_period": 100000, "gating": "silu", "norm": "rms_norm_f32",
        "positional_embedding": "rope", "depformer_dim": 1024, "depformer_dim_feedforward": dep_ff,
        "depformer_num_heads": 16, "depformer_num_layers": 6, "depformer_causal": True,
        "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": per_stream,
        "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
        "depformer_weights_per_step": True, "delays": _hibiki_delays(per_stream),
        "conditioners": _HIBIKI_CONDITIONER, "fuser": {"sum": ["description"]},
    }


#: The published Hibiki configs (config.json keys) the stand-ins follow. 1B: kyutai/hibiki-1b-mlx-bf16 (2048 wide,
#: 16 layers, 40 s context, 8 codebooks per stream) with its file names; 2B: kyutai-labs/moshi
#: configs/moshi_mlx_2b.json (16 codebooks per stream), whose file names are not published there: the stand-in's own.
HIBIKI_CONFIGS: dict[str, dict] = {
    "1b": {**_hibiki_config(2048, 16, 16, 500, 8, 4224), "model_type": "hibiki",
           "moshi_name": "hibiki-mlx-dc2cf5a5@80.safetensors", "mimi_name": "mimi-dbaa9758@125.safetensors",
           "tokenizer_name": "tokenizer_spm_48k_multi6_2.model"},
    "2b": {**_hibiki_config(2560, 20, 24, 3000, 16, 4224), "model_type": "hibiki",
           "moshi_name": "hibiki-2b-stand-in.safetensors", "mimi_name": MIMI_NAME,
           "tokenizer_name": "tokenizer_spm_48k_multi6_2.model"},
}
#: The repo each stand-in stands in for.
HIBIKI_REPOS = {"1b": "kyutai/hibiki-1b-mlx-bf16", "2b": "kyutai/hibiki-2b-mlx-bf16"}


def tiny_hibiki_config(size: str = "1b", text_card: int = 400) -> dict:
    """A published Hibiki config with every width shrunk (layout kept: codebooks, delays, conditioner, names).

    Widths stay quantizable with the published group sizes (64 for q8, 32 for q4).
    """
    tiny = dict(HIBIKI_CONFIGS[size])
    tiny.update(dim=256, num_heads=4, num_layers=2, context=64, text_card=text_card, depformer_dim=256,
                depformer_num_heads=4, depformer_num_layers=2, depformer_dim_feedforward=1056)
    return tiny


def write_stand_in_repo(folder: str | os.PathLike, kyutai_config: dict, seed: int = 0,
                        mimi_source: str | os.PathLike | None = None) -> Path:
    """A repo folder as published for MLX: config.json, and random bf16 weights, Mimi and tokenizer under the
    names config.json gives. `mimi_source`: an existing random Mimi to link (385 MB each otherwise).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LmConfig.from_dict(kyutai_config)
    mx.random.seed(seed)
    model = build_model(config, None, mx.bfloat16)
    materialise(model, None)
    save_lm(model, folder / kyutai_config["moshi_name"])
    mimi = folder / kyutai_config["mimi_name"]
    if mimi_source is not None:
        try:
            os.link(mimi_source, mimi)
        except OSError:  # another file system: a copy
            mimi.write_bytes(Path(mimi_source).read_bytes())
    else:
        write_random_mimi(mimi, seed)
    write_stand_in_tokenizer(folder / kyutai_config["tokenizer_name"], config.text_out_vocab_size)
    (folder / "config.json").write_text(json.dumps(kyutai_config, indent=2))
    return folder


def cache_stand_in_repo(cache_dir: str | os.PathLike, repo_id: str, folder: str | os.PathLike,
                        commit: str = "0" * 40) -> Path:
    """Put a repo folder into a Hugging Face hub cache (`HF_HUB_CACHE`) as a download would, at `main`, so the
    app finds it with HF_HUB_OFFLINE=1 through the same path as a real download. Returns the snapshot."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in Path(folder).iterdir():
        target = snapshot / item.name
        if not target.exists():
            try:
                os.link(item, target)
            except OSError:
                target.write_bytes(item.read_bytes())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


# --------------------------------------------------------------------------------------------------
# PersonaPlex: a stand-in repo in NVIDIA's layout (PyTorch names, 16 depformer steps, voices.tgz)
# --------------------------------------------------------------------------------------------------

#: PersonaPlex's layout at config_tiny()'s sizes: the stand-in's LM config is config_tiny() (dep_q 8), the
#: checkpoint holds 16 steps as NVIDIA's does, and loading keeps the first 8.
TINY_PERSONAPLEX = LayoutDims(dim=256, num_layers=4, hidden=704, dep_dim=256, dep_layers=2, dep_hidden=704)
#: The stand-in's own LM config file (the real repo's is Moshi 7B's, known in code, not read from the repo).
STAND_IN_LM_CONFIG = "lm-config.json"


def write_random_pytorch(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Path:
    """Random bfloat16 tensors with exactly `shapes` (PyTorch names), as one safetensors file."""
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    arrays = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        if name.endswith(".alpha"):  # RMS norm gains near 1, as trained ones are
            arrays[name] = mx.ones(shape, dtype=mx.bfloat16)
        else:
            arrays[name] = (0.05 * mx.random.normal(shape, key=keys[i])).astype(mx.bfloat16)
    with atomic_output(path, suffix=".safetensors") as tmp:  # MLX adds the suffix to any other name
        mx.save_safetensors(str(tmp), arrays)
    return Path(path)


def write_voices_archive(path: str | os.PathLike, files: list[Path]) -> Path:
    """A `voices.tgz` as NVIDIA's: the files under a `voices/` folder."""
    import tarfile

    with atomic_output(path) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f"{VOICES_FOLDER}/{f.name}")
    return Path(path)


def write_random_voice_presets(folder: str | os.PathLike, config: LmConfig, names: tuple[str, ...] = PRESETS,
                               seed: int = 0, frames: int = 4) -> list[Path]:
    """Random converted presets (NAME.safetensors: `frames` embeddings of the model's width and a token ring of
    its streams) in the layout `convert --voices` writes, so preset voices run with no torch here."""
    from safetensors.numpy import save_file

    from ..voices import CACHE_KEY, EMBEDDINGS_KEY, PRESET_SUFFIX

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ring = config.max_delay + 3  # the ring NVIDIA's presets store (see persona.PersonaPrompt.check)
    out = []
    for name in names:
        cache = rng.integers(0, config.audio_card - 1, size=(1 + config.audio_codebooks, ring), dtype=np.int32)
        cache[0] = rng.integers(0, config.text_out_vocab_size, size=ring, dtype=np.int32)  # the text stream
        arrays = {EMBEDDINGS_KEY: (0.02 * rng.standard_normal((frames, config.transformer.d_model))).astype(np.float32),
                  CACHE_KEY: cache}
        path = folder / f"{name}{PRESET_SUFFIX}"
        save_file(arrays, str(path))
        out.append(path)
    return out


def write_personaplex_stand_in(folder: str | os.PathLike, seed: int = 0, dims: LayoutDims = TINY_PERSONAPLEX,
                               mimi_source: str | os.PathLike | None = None,
                               tokenizer_source: str | os.PathLike | None = None) -> Path:
    """A folder shaped as nvidia/personaplex-7b-v1: model.safetensors (random, PersonaPlex's layout at `dims`),
    Mimi, tokenizer and voices.tgz under the repo's names, plus `lm-config.json` (config_tiny) to load it with.

    The archive holds random presets already converted (NAME.safetensors): NVIDIA's are torch files, which only
    torch writes. `mimi_source` / `tokenizer_source`: existing stand-ins to link (the demo's) instead of new ones.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_random_pytorch(folder / MOSHI_NAMES[None], layout(dims), seed)
    for source, name, make in ((mimi_source, MIMI_NAME, lambda p: write_random_mimi(p, seed)),
                               (tokenizer_source, TOKENIZER_NAME, write_stand_in_tokenizer)):
        target = folder / name
        if source is None:
            make(target)
        elif not target.exists():
            try:
                os.link(source, target)
            except OSError:
                target.write_bytes(Path(source).read_bytes())
    config = config_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        presets = write_random_voice_presets(tmp, config, seed=seed)
        write_voices_archive(folder / VOICES_ARCHIVE, presets)
    (folder / STAND_IN_LM_CONFIG).write_text(json.dumps({**config.to_dict(), "model_type": MODEL_TYPE}))
    return folder
