"""SentencePiece wrapper that turns Moshi's inner-monologue tokens into readable text pieces."""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece

from .errors import MoshiError

# Moshi's text stream uses these ids for "no word here" (padding / end of padding).
SILENT_TEXT_IDS = frozenset({0, 3})


class TokenizerError(MoshiError, ValueError):
    pass


class TextTokenizer:
    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"text tokenizer not found: {path}")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError):
            raise TokenizerError(f"{path} is not a SentencePiece model") from None
        self.path = path
        self.vocab_size = self._sp.GetPieceSize()

    def piece(self, token: int) -> str | None:
        """Readable text for one token, or None for padding, special and out-of-range ids."""
        if token in SILENT_TEXT_IDS or not 0 <= token < self.vocab_size:
            return None
        if self._sp.IsControl(token) or self._sp.IsUnknown(token):
            return None
        return self._sp.IdToPiece(token).replace("\u2581", " ")

    def encode(self, text: str) -> list[int]:
        return self._sp.Encode(text)
