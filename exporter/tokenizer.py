"""Tokenizer loading for parity text (SentencePiece `tokenizer.model` or HF `tokenizer.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class _SentencePiece:
    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))


class _HFTokenizerJson:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)


def load_tokenizer(path: Path | None) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when there is none. One that cannot be read (truncated,
    corrupt) is a UserError naming the file: parity on pseudo-text would hide it and pass."""
    from .errors import loading

    if path is None:
        return None
    with loading(path, "tokenizer", "re-download it or pass --tokenizer PATH"):
        return _SentencePiece(path) if path.suffix == ".model" else _HFTokenizerJson(path)


def parity_tokens(tokenizer: Tokenizer | None, text: str, count: int, vocab_size: int, bos_id: int) -> np.ndarray:
    """`count` token ids of held-out text (BOS first); deterministic pseudo-text without a tokenizer."""
    ids: list[int] = []
    if tokenizer is not None:
        ids = [bos_id] + [i for i in tokenizer.encode(text) if 0 <= i < vocab_size]
    if len(ids) < count:
        rng = np.random.default_rng(1234)
        ids += rng.integers(3, vocab_size, count - len(ids)).tolist()
    return np.asarray(ids[:count], dtype=np.int64)
