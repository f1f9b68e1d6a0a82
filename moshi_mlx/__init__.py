"""moshi_mlx: real-time spoken conversation with Kyutai's Moshi on MLX.

Public API: `load(ModelSource(...))` gets the model, Mimi and tokenizer (from Hugging Face, local files, or the
offline demo; `codec=CodecChoice("mlx")` for the MLX Mimi); `Assets.engine()` makes a `ConversationEngine` that turns 80 ms frames of 24 kHz audio
into Moshi's audio and transcript.

The names below are imported on first use, so `moshi_mlx.net.protocol` or the remote client can be used on a
machine without MLX (the terminal client talks to a server elsewhere).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "Assets": "model_files.assets",
    "load": "model_files.assets",
    "ModelSource": "model_files.source",
    "CodecChoice": "audio.codec_choice",
    "ConversationEngine": "engine",
    "EngineRunner": "engine",
    "FrameResult": "engine",
    "EngineSettings": "settings",
    "SamplingParams": "settings",
    "LmGen": "generate",
    "StepOutput": "generate",
}
# Spelled out (the same names as _PUBLIC) so linters see the lazy names below as exported.
__all__ = [
    "Assets",
    "CodecChoice",
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

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .audio.codec_choice import CodecChoice
    from .engine import ConversationEngine, EngineRunner, FrameResult
    from .generate import LmGen, StepOutput
    from .model_files.assets import Assets, load
    from .model_files.source import ModelSource
    from .settings import EngineSettings, SamplingParams


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'moshi_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
