"""The whole Mimi network in MLX: weights once, and any number of streams beside them.

``MimiNetwork.load(path, num_codebooks)`` reads the published checkpoint (the file rustymimi reads,
unchanged; only the codebooks asked for are loaded). Streaming is frame by frame: 1920 samples -> one
frame of codes (``encode_step``), one frame of codes -> 1920 samples (``decode_step``); each direction
keeps its own :class:`Stream`, and a fresh one is a reset. ``encode`` / ``decode`` take a whole clip in
one pass and give the same codes as streaming it; they hold the whole clip's activations (a 30 s clip takes
a few GB), so long audio goes through the streaming steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..errors import MoshiError
from .config import MimiConfig
from .conv import Conv1d, ConvTranspose1d, State
from .quantizer import SplitQuantizer
from .seanet import SeanetDecoder, SeanetEncoder
from .transformer import CodecTransformer, Window


class CodecWeightsError(MoshiError, ValueError):
    """The file is not a Mimi checkpoint this network can load (missing tensor, wrong shape)."""


@dataclass
class Stream:
    """One direction's streaming state: convolution buffers and the transformer's window."""

    window: Window
    convs: State = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.window.nbytes + sum(a.nbytes for a in self.convs.values())


class _Reader:
    """Tensors by name from a safetensors file, read one at a time (float32), with one-line errors."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = str(path)
        try:
            self._file = safe_open(self.path, framework="numpy")
        except Exception as e:  # not a file, not safetensors
            raise CodecWeightsError(f"cannot read Mimi weights {self.path}: {e}") from None
        self._names = set(self._file.keys())

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._names:
            raise CodecWeightsError(f"{self.path} is not a Mimi checkpoint: no tensor {name}")
        tensor = self._file.get_tensor(name)
        if tensor.shape != tuple(shape):
            raise CodecWeightsError(
                f"Mimi weights do not fit the Mimi network: {name} has shape {tensor.shape}, expected {tuple(shape)}"
            )
        return tensor.astype(np.float32, copy=False)


class MimiNetwork:
    def __init__(self, get, num_codebooks: int, cfg: MimiConfig = MimiConfig()) -> None:
        if not 1 <= num_codebooks <= cfg.max_codebooks:
            raise ValueError(f"num_codebooks must be in [1, {cfg.max_codebooks}], got {num_codebooks}")
        self.cfg, self.num_codebooks = cfg, num_codebooks
        stride, dim = cfg.downsample_stride, cfg.seanet.dimension
        try:
            self.encoder = SeanetEncoder(cfg.seanet, get)
            self.encoder_transformer = CodecTransformer(cfg.transformer, get, "encoder_transformer")
            # the 25 -> 12.5 Hz step pads with its first input repeated, not zeros (as the reference does)
            self.downsample = Conv1d(
                "downsample", get("downsample.conv.conv.conv.weight", (dim, dim, 2 * stride)), None, stride,
                replicate=True,
            )
            self.quantizer = SplitQuantizer(get, num_codebooks, cfg.quantizer_dim, dim, cfg.codebook_size)
            self.upsample = ConvTranspose1d(
                "upsample", get("upsample.convtr.convtr.convtr.weight", (dim, 1, 2 * stride)), None, stride,
                depthwise=True,
            )
            self.decoder_transformer = CodecTransformer(cfg.transformer, get, "decoder_transformer")
            self.decoder = SeanetDecoder(cfg.seanet, get)
        except CodecWeightsError:
            raise
        except ValueError as e:  # a reshape that does not fit: a tensor of the wrong shape
            raise CodecWeightsError(f"Mimi weights do not fit the Mimi network: {e}") from None
        # Materialized now: a lazy transpose would belong to this thread's stream, and the two directions
        # run on threads of their own.
        mx.eval(self._arrays())

    @classmethod
    def load(cls, path: str | os.PathLike, num_codebooks: int = 8, cfg: MimiConfig = MimiConfig()) -> MimiNetwork:
        return cls(_Reader(path), num_codebooks, cfg)

    def _arrays(self) -> list[mx.array]:
        """Every weight array, each once."""
        arrays: dict[int, mx.array] = {}

        def collect(obj) -> None:
            if isinstance(obj, mx.array):
                arrays.setdefault(id(obj), obj)
            elif isinstance(obj, (list, tuple)):
                for item in obj:
                    collect(item)
            elif hasattr(obj, "__dict__") and not isinstance(obj, type):
                for item in vars(obj).values():
                    collect(item)

        collect(self)
        return list(arrays.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the weights as loaded (float32)."""
        return sum(a.nbytes for a in self._arrays())

    def new_stream(self, batch: int = 1, frame: int = 0) -> Stream:
        """A fresh stream; ``frame`` > 0 starts its positions as if that many frames had gone by (for tests and
        benchmarks that must reach the positions' move back quickly; the output is the same up to rounding)."""
        positions = frame * self.cfg.downsample_stride  # the transformers run at 25 Hz: 2 positions a frame
        return Stream(self.encoder_transformer.new_window(batch, self.cfg.downsample_stride, position=positions))

    # -- streaming, one frame at a time ---------------------------------------------------------------
    def encode_step(self, pcm: mx.array, stream: Stream) -> mx.array:
        """pcm [B, frame_size] -> int32 codes [B, num_codebooks]."""
        x = self.encoder.step(pcm[:, :, None], stream.convs)
        x = self.encoder_transformer.step(x, stream.window)
        x = self.downsample.step(x, stream.convs)
        return self.quantizer.encode(x)[:, 0]

    def decode_step(self, codes: mx.array, stream: Stream) -> mx.array:
        """int codes [B, num_codebooks] -> pcm [B, frame_size]."""
        x = self.upsample.step(self.quantizer.decode(codes[:, None, :]), stream.convs)
        x = self.decoder_transformer.step(x, stream.window)
        return self.decoder.step(x, stream.convs)[:, :, 0]

    # -- whole clips ------------------------------------------------------------------------------------
    def encode(self, pcm: mx.array) -> mx.array:
        """pcm [B, T] (T a whole number of frames) -> int32 codes [B, num_codebooks, T / frame_size]."""
        x = self.encoder_transformer(self.encoder(pcm[:, :, None]))
        return self.quantizer.encode(self.downsample(x)).transpose(0, 2, 1)

    def decode(self, codes: mx.array) -> mx.array:
        """int codes [B, num_codebooks, F] -> pcm [B, F * frame_size]."""
        x = self.upsample(self.quantizer.decode(codes.transpose(0, 2, 1)))
        return self.decoder(self.decoder_transformer(x))[:, :, 0]
