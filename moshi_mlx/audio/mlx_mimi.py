"""Mimi in MLX behind the codec interface: one copy of the weights, one bounded stream per direction.

Each direction (encoder, decoder) runs on its own thread with its own MLX stream on the chosen device,
so the two overlap as rustymimi's do, and MLX streams stay with the thread that made them. Memory is
the weights (about 0.33 GB in float32 with 8 codebooks) plus two streams of about 8 MB each and a step's
workspace each way, the same after a minute or a day: the transformers' keys and values live in a rotating
window of their context.

Device: the CPU by default. On a Mac the LM owns the GPU (its step is the real-time bottleneck, and
Metal runs one command queue at a time per process in practice), while Mimi's matrix products on the CPU
go through Accelerate; ``device="gpu"`` puts Mimi on its own GPU stream instead, beside the LM's.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..codec.network import MimiNetwork, Stream
from ..errors import MoshiError, first_line
from ..mlx_thread import MlxThread
from .mimi import FrameCodec, check_codes, check_num_codebooks, check_pcm_frame
from .mimi_pool import MimiError

#: MLX memory one direction's step allocates and frees again, 8 codebooks (measured with MLX 0.32 on the CPU:
#: 12.8 MB encoding, 14.3 MB decoding, 14.5 MB both at once; rounded up per direction since both may step together).
STEP_WORKSPACE_BYTES = 16 << 20

#: Where the MLX Mimi may run (``--mimi-device``).
DEVICES = ("cpu", "gpu")
DEFAULT_DEVICE = "cpu"


def _device(name: str) -> mx.Device:
    if name not in DEVICES:
        raise MimiError(f"Mimi device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "gpu" and not mx.is_available(mx.gpu):
        raise MimiError("--mimi-device gpu: this MLX has no GPU here (use cpu)")
    return mx.Device(mx.gpu if name == "gpu" else mx.cpu)


class MlxMimi(FrameCodec):
    """Streaming Mimi in MLX: the interface of :class:`moshi_mlx.audio.mimi.Mimi`, any session length.

    Args:
        path: the Mimi safetensors file (the published one, unchanged).
        num_codebooks: codebooks per frame (1..32; the model says how many: 8, 16 or 32).
        device: "cpu" (default) or "gpu".
    """

    name = "mlx"
    dtype = "f32"

    def __init__(self, path: str | os.PathLike, num_codebooks: int = 8, *, device: str = DEFAULT_DEVICE) -> None:
        self.path = Path(path)
        check_num_codebooks(num_codebooks)
        self.num_codebooks, self.device = int(num_codebooks), device
        if not self.path.is_file():
            raise MimiError(f"Mimi weights not found: {self.path}")
        dev = _device(device)
        self._enc_lane, self._dec_lane = MlxThread("mimi-encoder", dev), MlxThread("mimi-decoder", dev)
        try:
            self.net = self._enc_lane.run(lambda: MimiNetwork.load(self.path, self.num_codebooks))
        except MoshiError as e:
            self.close()
            raise MimiError(f"cannot load Mimi weights from {self.path}: {first_line(e)}") from None
        self._weights = self.net.nbytes
        self._stream_bytes = self._warm_up()
        self._enc: Stream = self._enc_lane.run(self.net.new_stream)
        self._dec: Stream = self._dec_lane.run(self.net.new_stream)

    def _warm_up(self) -> int:
        """One silent frame each way on throwaway streams: compiles the steps (so the first live frame is not
        slow) and fills every convolution buffer, which a fresh stream makes only on its first step. Returns
        both streams' full size."""
        def one_way(encode: bool) -> int:
            stream = self.net.new_stream()
            if encode:
                mx.eval(self.net.encode_step(mx.zeros((1, self.net.cfg.frame_size)), stream))
            else:
                mx.eval(self.net.decode_step(mx.zeros((1, self.num_codebooks), mx.int32), stream))
            return stream.nbytes

        return self._enc_lane.run(lambda: one_way(True)) + self._dec_lane.run(lambda: one_way(False))

    # -- streaming -----------------------------------------------------------------------------------
    def encode_frame(self, pcm: np.ndarray) -> np.ndarray:
        """Encode one 80 ms frame: float [1920] in [-1, 1] -> uint32 [num_codebooks]."""
        x = check_pcm_frame(pcm).reshape(1, -1)
        codes = self._enc_lane.run(lambda: np.array(self.net.encode_step(mx.array(x), self._enc)))
        return codes.reshape(-1).astype(np.uint32)

    def decode_frame(self, codes) -> np.ndarray:
        """Decode one frame: integer codes [num_codebooks] in [0, 2048) -> float32 [1920]."""
        c = check_codes(codes, self.num_codebooks).reshape(1, -1).astype(np.int32)
        pcm = self._dec_lane.run(lambda: np.array(self.net.decode_step(mx.array(c), self._dec)))
        return pcm.reshape(-1)

    def start_at(self, frame: int) -> None:
        """Fresh streams both ways whose positions start ``frame`` frames in, as if a session had run that long.

        For tests and benchmarks only: the positions move back every few hours of audio (see
        ``codec/transformer.py``) and this reaches that point in seconds instead of hours.
        """
        self._enc = self._enc_lane.run(lambda: self.net.new_stream(frame=frame))
        self._dec = self._dec_lane.run(lambda: self.net.new_stream(frame=frame))

    def reset_encoder(self) -> None:
        self._enc = self._enc_lane.run(self.net.new_stream)

    def reset_decoder(self) -> None:
        self._dec = self._dec_lane.run(self.net.new_stream)

    # -- memory ---------------------------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        """MLX memory at the codec's peak: weights, both directions' full streaming state and a step's workspace
        each way; all inside MLX's allocator and fixed for any session length (the memory plan counts it)."""
        return self._weights + self._stream_bytes + 2 * STEP_WORKSPACE_BYTES

    @property
    def mlx_bytes(self) -> int:
        return self.resident_bytes

    @property
    def live_instances(self) -> int:
        return 1

    @property
    def memory_note(self) -> str:
        return f"MLX Mimi on the {self.device.upper()}, one weight copy, in MLX beside the LM"

    def close(self) -> None:
        for lane in (getattr(self, "_enc_lane", None), getattr(self, "_dec_lane", None)):
            if lane is not None:
                lane.close()

    def __repr__(self) -> str:
        return f"MlxMimi({str(self.path)!r}, num_codebooks={self.num_codebooks}, device={self.device!r})"
