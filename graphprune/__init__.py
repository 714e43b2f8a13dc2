"""graphprune: a compiler-style graph transformation toolkit for one-shot LLM pruning."""
from __future__ import annotations

__version__ = "0.1.0"
