"""Magnitude pruning: keep the largest ``|W_ij|``.

The baseline every other solver is measured against. It ignores the calibration
statistics (they are only shape-checked, and used for the reported error when
``XᵀX`` happens to be present), so it needs no calibration pass at all.

Ranking follows :meth:`SparsitySpec.keep_mask`: per output row for unstructured
sparsity (every row loses the same count), per group of ``M`` inputs for ``N:M``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from graphprune.errors import ConfigError
from graphprune.solvers.base import LayerStats, SolveResult, check_inputs, solve_result
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
    check_inputs(weight, stats, spec, name)
    with torch.no_grad():
        w = weight.detach()
        # Rank in at least float32: half-precision ties would make the mask depend on rounding.
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        mask = spec.keep_mask(w.to(compute).abs())
        pruned = w.masked_fill(~mask, 0)
    return solve_result(w, pruned, mask, stats.xtx)
