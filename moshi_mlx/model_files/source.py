"""Where the model comes from: the model-choosing flags as one frozen value, `ModelSource`.

A fact about the command line, not about files: `hub.py` finds the files a `ModelSource` names, and every entry
point builds one the same way (`ModelSource.from_args(args)`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

__all__ = ["FLAGS", "ModelSource"]

#: The flag that gives each kind of file (named in every "pass ... PATH" hint).
FLAGS = {
    "moshi": "--moshi-weights",
    "mimi": "--mimi-weights",
    "tokenizer": "--tokenizer",
    "lm_config": "--lm-config",
}
#: The ModelSource field of each kind of file.
FILE_FIELDS = {"moshi": "moshi_weights", "mimi": "mimi_weights", "tokenizer": "tokenizer", "lm_config": "lm_config"}
_FLAG_OF = {"quantize": "-q", "hf_repo": "--hf-repo", "revision": "--revision",
            **{f: FLAGS[k] for k, f in FILE_FIELDS.items()}}


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: the seven model-choosing flags, named as the CLI names them.

    `ModelSource.from_args(args)` takes them straight from argparse, so every entry point chooses
    models the same way.
    """

    quantize: int | None = None
    hf_repo: str | None = None
    revision: str | None = None
    moshi_weights: str | os.PathLike | None = None
    mimi_weights: str | os.PathLike | None = None
    tokenizer: str | os.PathLike | None = None
    lm_config: str | os.PathLike | dict | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelSource":
        return cls(**{f.name: getattr(args, f.name, None) for f in fields(cls)})

    @property
    def given_flags(self) -> list[str]:
        """The flags that were given, as the user typed them (for refusing them where they make no sense, e.g. --demo)."""
        return [_FLAG_OF[f.name] for f in fields(self) if getattr(self, f.name) is not None]
