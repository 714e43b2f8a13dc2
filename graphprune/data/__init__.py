"""Calibration and evaluation text."""
from graphprune.data.text import (
    BUILTIN_TEXTS,
    PROTOCOL_EVAL_TEXTS,
    PROTOCOL_TEXT,
    SECOND_TEXT,
    NamedText,
    TextSplits,
    TokenSplits,
    calibration_shares,
    default_text,
    load_texts,
    news_text,
    read_texts,
    tokenize,
    unknown_text_message,
)

__all__ = [
    "BUILTIN_TEXTS", "PROTOCOL_EVAL_TEXTS", "PROTOCOL_TEXT", "SECOND_TEXT", "NamedText", "TextSplits", "TokenSplits",
    "calibration_shares", "default_text", "load_texts", "news_text", "read_texts", "tokenize",
    "unknown_text_message",
]
