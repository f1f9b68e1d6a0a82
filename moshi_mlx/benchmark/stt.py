"""What a speech-to-text model costs: alone (`--stt-only`: step time and real-time factor per model size) and on top
of Moshi (`--transcribe-user`: the extra time per 80 ms frame when the user's words are written down too).

A step here is one 80 ms frame through the STT model's own Mimi (32 codebooks) and its LM, as
:class:`~moshi_mlx.transcribe.Transcriber` runs it. Model sizes are random weights in the layout of Kyutai's STT
checkpoints (kyutai-labs/delayed-streams-modeling configs/config-stt-*-hf.toml): ``1b`` (stt-1b-en_fr: 16 layers of
2048, 16 heads, window 750, 8000 text pieces, 4 VAD heads) and ``2.6b`` (stt-2.6b-en: 48 layers of 2048, 32 heads,
window 375, 4000 text pieces); ``tiny`` for tests.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from ..generate import LmGen
from ..mlx_thread import MlxThread
from ..model_files.budget import weights_bytes
from ..model_files.checkpoint import GROUP_SIZE_FOR_BITS, Quantization, build_model, materialise
from ..models.config import LmConfig, SttConfig, TransformerConfig, config_tiny_stt
from ..settings import GREEDY
from ..transcribe import Transcriber
from .measure import Stats, gb, timed
from .pipeline import speechlike_pcm

FRAME_MS = 80.0


def stt_config(size: str) -> LmConfig:
    """The STT layout of one published size (or `tiny`), for random weights."""
    tiny = config_tiny_stt()
    if size == "tiny":
        return tiny
    if size == "1b":
        return dataclasses.replace(
            tiny, transformer=TransformerConfig(d_model=2048, num_heads=16, num_layers=16, dim_feedforward=8192,
                                                context=750))
    if size == "2.6b":
        return dataclasses.replace(
            tiny, transformer=TransformerConfig(d_model=2048, num_heads=32, num_layers=48, dim_feedforward=8192,
                                                context=375),
            text_in_vocab_size=4001, text_out_vocab_size=4000, extra_heads_num_heads=0,
            stt=SttConfig(audio_delay_seconds=2.5, audio_silence_prefix_seconds=1.0))
    raise ValueError(f"unknown STT size {size!r}; choose one of: {', '.join(STT_SIZES)}")


STT_SIZES = ("tiny", "1b", "2.6b")


class _Words:
    """The transcriber needs a tokenizer; timing does not read the words."""

    def piece(self, token: int) -> str | None:
        return None


@dataclass(frozen=True)
class SttTimes:
    """One STT model's frame (its Mimi encode + LM step) alone."""

    size: str
    bits: int | None
    dtype: str
    params: int
    weights_gb: float
    step: Stats  # ms per 80 ms frame
    rtf: float  # median / 80 ms: below 1 keeps up


@dataclass(frozen=True)
class OnTopTimes:
    """Moshi's frame (engine.process) alone, and with the STT model's frame run beside it on its own worker."""

    stt: str  # which STT model
    alone: Stats
    with_stt: Stats
    stt_step: Stats  # the STT frame's own time on its worker, meanwhile
    extra_ms: float  # with_stt.median - alone.median: what --transcribe-user adds per frame

    @property
    def rtf(self) -> float:
        return round(self.with_stt.median_ms / FRAME_MS, 3)


def random_stt(size: str, bits: int | None, dtype: mx.Dtype = mx.bfloat16) -> mx.array:
    """Random weights of an STT size (quantized to `bits` with the published group size), evaluated."""
    quant = Quantization(bits, GROUP_SIZE_FOR_BITS[bits]) if bits else None
    mx.random.seed(0)
    model = build_model(stt_config(size), quant, dtype)
    materialise(model, None)
    return model


def _frames_through(transcriber: Transcriber, steps: int, warmup: int, bar=None) -> list[float]:
    pcm = speechlike_pcm(64, 5)
    return timed(lambda i: transcriber.feed(pcm[i % 64]), steps, warmup, bar)


def time_stt(size: str, lm, encoder, steps: int, warmup: int, bits: int | None, bar=None) -> SttTimes:
    """The STT frame alone, on a worker thread with its own MLX stream as the app runs it."""
    worker = MlxThread("stt-bench")
    try:
        times = worker.run(lambda: _frames_through(Transcriber(LmGen(lm, GREEDY, GREEDY), encoder, _Words()),
                                                   steps, warmup, bar))
    finally:
        worker.close()
    step = Stats.of(times)
    from .loaded import param_count

    params = param_count(lm.config)  # logical, before any 4/8-bit packing
    return SttTimes(size, bits, str(lm.dtype).replace("mlx.core.", ""), int(params), gb(weights_bytes(lm)), step,
                    round(step.median_ms / FRAME_MS, 3))


def time_on_top(engine, lm, encoder, label: str, steps: int, warmup: int,
                after: Callable[[int, float], None] | None = None) -> OnTopTimes:
    """Moshi's frames alone, then each frame with the STT's frame beside it (a frame is done when both are)."""
    pcm = speechlike_pcm(64, 1)
    engine.reset()
    alone = timed(lambda i: engine.process(pcm[i % 64]), steps, warmup, None, after)
    engine.reset()
    worker = MlxThread("stt-user")
    stt_ms: list[float] = []
    try:
        transcriber = worker.run(lambda: Transcriber(LmGen(lm, GREEDY, GREEDY), encoder, _Words()))

        def stt_frame(frame) -> None:
            t0 = time.perf_counter()
            transcriber.feed(frame)
            stt_ms.append((time.perf_counter() - t0) * 1e3)

        def both(i: int) -> None:
            done = worker.submit(stt_frame, pcm[i % 64])
            engine.process(pcm[i % 64])
            done.result()

        together = timed(both, steps, warmup, None, after)
    finally:
        worker.close()
        engine.reset()
    a, w = Stats.of(alone), Stats.of(together)
    return OnTopTimes(label, a, w, Stats.of(stt_ms[warmup:] or stt_ms), round(w.median_ms - a.median_ms, 3))


def stt_lines(rows: list[SttTimes]) -> list[str]:
    """The STT-only table, in the benchmark's row format."""
    lines = [f"{'STT, per 80 ms frame (its Mimi + LM)':<46} {'median':>8} {'p90':>8} {'max':>8}  ms   RTF"]
    for r in rows:
        precision = f"q{r.bits}" if r.bits else r.dtype
        name = f"STT {r.size} {precision} ({r.params / 1e6:.0f}M params, {r.weights_gb} GB)"
        lines.append(f"{name:<46} {r.step.median_ms:8.2f} {r.step.p90_ms:8.2f} {r.step.max_ms:8.2f}  "
                     f"{r.rtf:6.3f} {'keeps up' if r.rtf < 1 else 'falls behind'}")
    return lines


def on_top_lines(t: OnTopTimes) -> list[str]:
    def row(name: str, s: Stats) -> str:
        return f"{name:<46} {s.median_ms:8.2f} {s.p90_ms:8.2f} {s.max_ms:8.2f}"

    return [
        row("Moshi frame alone (engine.process)", t.alone),
        row(f"Moshi frame + your words ({t.stt})", t.with_stt),
        row("  the STT frame on its worker, meanwhile", t.stt_step),
        f"{'--transcribe-user adds per frame':<46} {t.extra_ms:8.2f}  (RTF with it {t.rtf:.3f})",
    ]
