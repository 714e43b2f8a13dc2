"""Calibration and evaluation text per the measurement protocol (docs/PROTOCOL.md).

The default text is Python's own ``pydoc_data.topics``: tokenized once, the first 80 %
of tokens is the calibration pool and the last 20 % the evaluation split.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from graphprune.errors import DataError

log = logging.getLogger(__name__)

CALIB_FRACTION = 0.8


def default_text() -> str:
    """The protocol's embedded default text (Python's pydoc topics, sorted by key)."""
    import pydoc_data.topics

    return "\n\n".join(v for _, v in sorted(pydoc_data.topics.topics.items()))


def read_texts(paths: Sequence[str | Path]) -> str:
    """Concatenate user text files (UTF-8), separated by blank lines."""
    parts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"text file {path} does not exist; pass existing UTF-8 text files with --text.")
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc}); convert it or pass another file.") from exc
    return "\n\n".join(parts)


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """Token ids of the whole text as a 1-D int64 tensor (no special tokens added)."""
    if callable(tokenizer):  # Hugging Face tokenizers
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:  # plain encoders such as graphprune.models.ByteTokenizer
        ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TokenSplits:
    """The tokenized text split into a calibration pool and an evaluation split."""

    calib: Tensor
    eval: Tensor

    @classmethod
    def from_text(cls, tokenizer: Any, text: str | None = None, calib_fraction: float = CALIB_FRACTION) -> "TokenSplits":
        ids = tokenize(tokenizer, default_text() if text is None else text)
        if ids.numel() < 16:
            raise DataError(f"the text has only {ids.numel()} tokens; give a longer text.")
        cut = int(calib_fraction * ids.numel())
        return cls(calib=ids[:cut], eval=ids[cut:])

    def calibration(self, samples: int = 64, length: int = 512, seed: int = 0) -> Tensor:
        """``[samples, length]`` segments at protocol offsets ``randint(0, len(pool) - L)``."""
        if samples <= 0 or length <= 1:
            raise DataError(f"calibration needs samples >= 1 and length >= 2, got {samples}x{length}.")
        if self.calib.numel() <= length:
            raise DataError(
                f"the calibration pool has {self.calib.numel()} tokens, fewer than one segment of {length}; "
                "give more text or lower --calib-len."
            )
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, self.calib.numel() - length, (samples,), generator=gen)
        return torch.stack([self.calib[s : s + length] for s in starts.tolist()])

    def eval_windows(self, length: int = 512) -> Tensor:
        """All non-overlapping ``length``-token windows of the evaluation split (remainder dropped)."""
        n = self.eval.numel() // length
        if n == 0:
            raise DataError(
                f"the evaluation split has {self.eval.numel()} tokens, fewer than one window of {length}; "
                "give more text or a shorter --eval-len."
            )
        return self.eval[: n * length].reshape(n, length)
