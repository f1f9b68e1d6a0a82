"""moshi_mlx: real-time spoken conversation with Kyutai's Moshi on MLX.

Public API: `load(ModelSource(...))` gets the model, Mimi and tokenizer (from Hugging Face, local files, or the
offline demo); `Assets.engine()` makes a `ConversationEngine` that turns 80 ms frames of 24 kHz audio
into Moshi's audio and transcript.
"""

from .assets import Assets, load
from .hub import ModelSource
from .engine import ConversationEngine, EngineRunner, EngineSettings, FrameResult
from .generate import LmGen, StepOutput
from .sampling import SamplingParams

__all__ = [
    "Assets",
    "ConversationEngine",
    "EngineRunner",
    "EngineSettings",
    "FrameResult",
    "LmGen",
    "ModelSource",
    "SamplingParams",
    "StepOutput",
    "load",
]
__version__ = "0.1.0"
