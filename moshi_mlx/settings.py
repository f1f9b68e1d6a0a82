"""What a conversation's sampling is set to: plain dataclasses, no MLX.

The wire protocol, the command line and the engine all speak these, so parsing a client's query
or a flag never needs the model's framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 250

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


DEFAULT_TEXT_SAMPLING = SamplingParams(temperature=0.7, top_k=25)
DEFAULT_AUDIO_SAMPLING = SamplingParams(temperature=0.8, top_k=250)
GREEDY = SamplingParams(temperature=0.0, top_k=0)


@dataclass(frozen=True)
class TextControls:
    """Kyutai's production-server controls over the text stream (defaults leave sampling unchanged).

    repetition_penalty: over the last `repetition_penalty_context` text tokens that are not padding,
    end-of-padding or start tokens, each distinct token's logit is divided by the penalty if positive
    and multiplied by it if negative (1.0: off).
    pad_mult: the padding token's sampling probability is multiplied by exp(pad_mult), i.e. pad_mult is
    added to its tempered logit (negative values make Moshi talk more; 0: off).
    """

    repetition_penalty: float = 1.0
    repetition_penalty_context: int = 64
    pad_mult: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.repetition_penalty_context < 0:
            raise ValueError(f"repetition_penalty_context must be >= 0, got {self.repetition_penalty_context}")
        if not math.isfinite(self.pad_mult):
            raise ValueError(f"pad_mult must be a finite number, got {self.pad_mult}")

    @property
    def penalises(self) -> bool:
        return self.repetition_penalty != 1.0 and self.repetition_penalty_context > 0


DEFAULT_TEXT_CONTROLS = TextControls()


@dataclass(frozen=True)
class EngineSettings:
    """Sampling settings. `seed` is a convenience that seeds both streams; `text_seed` and
    `audio_seed`, when given, take precedence for their stream."""

    text: SamplingParams = DEFAULT_TEXT_SAMPLING
    audio: SamplingParams = DEFAULT_AUDIO_SAMPLING
    seed: int | None = None
    text_controls: TextControls = DEFAULT_TEXT_CONTROLS
    text_seed: int | None = None
    audio_seed: int | None = None
    kv_bits: int | None = None  # LM key/value precision 16/8/4; None: the memory plan's, else the default (8)
    context: int | None = None  # LM attention window; None = the checkpoint's

    @property
    def seeds(self) -> tuple[int | None, int | None]:
        """The (text, audio) seeds in effect."""
        return (
            self.text_seed if self.text_seed is not None else self.seed,
            self.audio_seed if self.audio_seed is not None else self.seed,
        )
