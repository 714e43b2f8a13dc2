"""Magnitude pruning: keep the largest ``|W_ij|``.

The baseline every other solver is measured against. It ignores the calibration
statistics (they are only shape-checked, and used for the reported error when
``XᵀX`` happens to be present), so it needs no calibration pass at all.

Ranking follows :meth:`SparsitySpec.keep_mask`: per output row for unstructured
sparsity (every row loses the same count), per group of ``M`` inputs for ``N:M``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from graphprune.errors import ConfigError
from graphprune.solvers.base import LayerStats, SolveResult, prune_by_score
from graphprune.solvers.spec import SparsitySpec


def magnitude_prune(
    weight: Tensor, stats: LayerStats, spec: SparsitySpec, *, name: str = "weight", **options: Any
) -> SolveResult:
    """Prune ``weight [out, in]`` by ``|W|``.

    Args:
        weight: the Linear's weight ``[out, in]``; not modified.
        stats: calibration statistics of the Linear's input (only shape-checked).
        spec: sparsity target and pattern.
        name: how errors refer to this weight (e.g. the module path).
        **options: none are accepted; an unknown option is a :class:`ConfigError`
            rather than being silently ignored.

    Returns:
        The pruned weight (same dtype and device as ``weight``, exactly zero where the
        mask is False), the boolean keep-mask, and ``info`` with the achieved
        ``sparsity`` (plus ``error`` / ``rel_error`` when ``stats.xtx`` is present).
    """
    if options:
        raise ConfigError(f"{name}: magnitude_prune takes no options, got {sorted(options)}.")
    return prune_by_score(weight, stats, spec, name)
