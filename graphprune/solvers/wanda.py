"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs").

The score of weight ``W_ij`` is ``|W_ij| · ‖X_j‖₂``: a small weight on an input
column that carries large activations matters as much as a large weight on a quiet
one. Scores are compared within each output row (the paper's finding: per-output
comparison beats a layer-wide ranking for LLMs), and within each group of ``M``
inputs for ``N:M``. No weight update follows; the mask is the whole method.

Only the per-column squared norms ``Σ_t x_tj²`` are needed, not ``XᵀX``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from graphprune.errors import ConfigError
from graphprune.solvers.base import LayerStats, SolveResult, check_inputs, prune_by_score
from graphprune.solvers.spec import SparsitySpec


def wanda_prune(
    weight: Tensor, stats: LayerStats, spec: SparsitySpec, *, name: str = "weight", **options: Any
) -> SolveResult:
    """Prune ``weight [out, in]`` by ``|W_ij| · ‖X_j‖₂``, ranked per output row.

    Args:
        weight: the Linear's weight ``[out, in]``; not modified.
        stats: calibration statistics; ``stats.col_sq [in]`` is used.
        spec: sparsity target and pattern.
        name: how errors refer to this weight (e.g. the module path).
        **options: none are accepted; an unknown option is a :class:`ConfigError`.

    Returns:
        The pruned weight (same dtype and device as ``weight``, exactly zero where the
        mask is False), the boolean keep-mask, and ``info`` with the achieved
        ``sparsity`` (plus ``error`` / ``rel_error`` when ``stats.xtx`` is present).
    """
    if options:
        raise ConfigError(f"{name}: wanda_prune takes no options, got {sorted(options)}.")
    check_inputs(weight, stats, spec, name)  # before the statistics are read
    return prune_by_score(weight, stats, spec, name, column_scale=stats.col_norms())
