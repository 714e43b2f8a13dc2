"""Evaluation: perplexity and reconstruction error."""
from graphprune.eval.perplexity import perplexity

__all__ = ["perplexity"]
