"""Evaluation: perplexity per the protocol (one process or split across ranks)."""
from graphprune.eval.perplexity import perplexity, sharded_perplexity

__all__ = ["perplexity", "sharded_perplexity"]
