"""Brute-force references the solver tests compare against."""
from __future__ import annotations

import torch


def brute_force_keep(score: torch.Tensor, drop: int, span: int) -> torch.Tensor:
    """Keep-mask dropping the ``drop`` lowest scores of every ``span`` consecutive entries of each row."""
    rows, cols = score.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for start in range(0, cols, span):
            for j in sorted(range(start, start + span), key=lambda j: float(score[r, j]))[:drop]:
                keep[r, j] = False
    return keep
