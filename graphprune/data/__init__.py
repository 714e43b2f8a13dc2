"""Calibration and evaluation text."""
from graphprune.data.text import TokenSplits, default_text, read_texts, tokenize

__all__ = ["TokenSplits", "default_text", "read_texts", "tokenize"]
