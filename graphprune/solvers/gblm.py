"""GBLM-Pruner (Das, Sun, Ma, Shen 2023, "Beyond Size: How Gradients Shape Pruning
Decisions in Large Language Models").

The score of weight ``W_ij`` adds a gradient term to Wanda's:

    S_ij = |W_ij| · ‖X_j‖₂  +  α · |W_ij| · ‖G_ij‖₂

where ``‖G_ij‖₂ = sqrt(Σ_s g_ij(s)²)`` is the ℓ2 norm, over calibration samples ``s``,
of the per-sample gradients of the language-model loss (``stats.grad_sq`` holds
``Σ_s g²``), and ``α`` (default 100) weights the gradient term. This follows the
reference code (VILA-Lab/GBLM-Pruner): its gradient pass accumulates
``Σ_s (α·g)²`` and stores the square root, i.e. ``α·‖G‖₂``, and the pruning step adds
``|W|·‖X_j‖`` and ``|W|·α‖G‖₂``. Its activation term is ``sqrt(Σ_t x_tj² / N)`` with
``N`` the number of calibration *sequences*; pass ``samples=N`` to reproduce that
scaling exactly. By default ``‖X_j‖₂`` is the plain column norm (the paper's formula).
Only the ratio of the two terms matters for the ranking.

Scores are ranked per output row (unstructured, as in the paper and Wanda) or within
each group of ``M`` inputs (``N:M``). There is no weight update.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers.base import LayerStats, SolveResult, check_inputs, check_int, check_number, solve_result
from graphprune.solvers.spec import SparsitySpec


def gblm_score(weight: Tensor, stats: LayerStats, alpha: float = 100.0, samples: int | None = None) -> Tensor:
    """The GBLM importance ``|W|·‖X_j‖ + α|W|·sqrt(grad_sq)``, ``[out, in]``, float32/64."""
    if stats.grad_sq is None:
        raise SolverError("GBLM needs gradient statistics; run the gradient pass (stats.grad_sq is missing).")
    if stats.grad_sq.shape != weight.shape:
        raise SolverError(
            f"GBLM: gradient statistics have shape {tuple(stats.grad_sq.shape)} but the weight has "
            f"{tuple(weight.shape)}; they belong to a different layer."
        )
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_sq = stats.grad_sq.to(device=weight.device, dtype=compute)
    if not bool(torch.isfinite(grad_sq).all()) or bool((grad_sq < 0).any()):
        raise SolverError(
            "GBLM: gradient statistics contain NaN, Inf or negative values; the gradient pass overflowed "
            "(accumulate squared gradients in float32 or float64)."
        )
    col_sq = stats.col_sq.to(device=weight.device, dtype=compute).clamp_min(0)
    if samples is not None:
        col_sq = col_sq / samples
    w = weight.detach().to(compute).abs()
    return w * col_sq.sqrt() + alpha * w * grad_sq.sqrt()


def gblm_prune(
    weight: Tensor,
    stats: LayerStats,
    spec: SparsitySpec,
    alpha: float = 100.0,
    *,
    samples: int | None = None,
    name: str = "weight",
    **options: Any,
) -> SolveResult:
    """Prune ``weight [out, in]`` by the GBLM score, ranked per output row (or per N:M group).

    Args:
        weight: the Linear's weight ``[out, in]``; not modified.
        stats: calibration statistics; ``stats.col_sq`` and ``stats.grad_sq [out, in]``
            (``Σ_samples g²`` of the language-model loss) are used.
        spec: sparsity target and pattern.
        alpha: weight of the gradient term (the paper's and reference code's 100).
        samples: number of calibration sequences summed in ``grad_sq``; when given the
            activation norm is divided by ``sqrt(samples)`` as in the reference code.
        name: how errors refer to this weight (e.g. the module path).
        **options: none other are accepted; an unknown option is a :class:`ConfigError`.

    Returns:
        The pruned weight (same dtype and device, exactly zero where the mask is False),
        the keep-mask, and ``info`` with ``sparsity`` and ``alpha`` (plus ``error`` /
        ``rel_error`` when ``stats.xtx`` is present).

    Raises:
        SolverError: ``stats.grad_sq`` is missing or malformed.
        ConfigError: bad ``alpha`` / ``samples`` or an unknown option.
    """
    if options:
        raise ConfigError(f"{name}: gblm_prune got unknown option(s) {sorted(options)}; it takes alpha and samples.")
    check_number(name, "alpha", alpha, hint="the paper uses 100")
    if samples is not None:
        check_int(name, "samples", samples, 1, hint="the number of calibration sequences")
    check_inputs(weight, stats, spec, name)
    with torch.no_grad():
        try:
            score = gblm_score(weight, stats, alpha, samples)
        except SolverError as exc:
            raise SolverError(f"{name}: {exc}") from exc
        mask = spec.keep_mask(score)
        pruned = weight.detach().masked_fill(~mask, 0)
    return solve_result(weight, pruned, mask, stats.xtx, alpha=float(alpha))
