"""Masked gradient refinement: improve pruned weights on a fixed mask, after any solver.

Gradient steps on the layer loss ``f(Ŵ) = tr((Ŵ − W₀) H (Ŵ − W₀)ᵀ)`` restricted to the mask. By default each row takes the exact
line-search step ``α = ‖g‖² / (2 gHg)`` along its masked gradient ``g`` (steepest descent,
never worse than the fixed step); with ``lr`` the step is fixed and must satisfy
``lr ≤ 1/λ_max(H)``. Either way the loss of every row never increases.

The proximal 2:4 solver ends with the same descent (:func:`masked_descent`); the pruning
pass runs :func:`masked_gd_refine` after any solver when ``--refine masked-gd`` is given.
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers.base import LayerStats, check_int, check_number, layer_hessian

F64 = torch.float64


def masked_gd_refine(
    weight_orig: Tensor,
    pruned: Tensor,
    mask: Tensor,
    stats: LayerStats,
    steps: int = 50,
    lr: float | None = None,
    *,
    name: str = "weight",
) -> Tensor:
    """Masked gradient steps reducing ``‖(W₀ − Ŵ)X‖²`` with ``Ŵ`` fixed to ``mask``.

    Args:
        weight_orig: the dense weight ``W₀ [out, in]``.
        pruned: the pruned weight to start from (entries off ``mask`` are ignored).
        mask: boolean keep-mask ``[out, in]``; it is kept exactly.
        stats: calibration statistics with ``stats.xtx``.
        steps: number of steps (0 returns ``pruned`` masked).
        lr: None = exact line search per row; else a fixed step in units of
            ``f = tr(ΔHΔᵀ)``, ``H = XᵀX/n``, at most ``1/λ_max(H)``.
        name: how errors refer to this weight.

    Returns:
        The refined weight (dtype of ``pruned``, zero off ``mask``); no row's loss is
        larger than at the start.
    """
    if weight_orig.dim() != 2 or pruned.shape != weight_orig.shape or mask.shape != weight_orig.shape:
        raise SolverError(
            f"{name}: masked_gd_refine needs weight, pruned weight and mask of one 2-D shape, got "
            f"{tuple(weight_orig.shape)}, {tuple(pruned.shape)} and {tuple(mask.shape)}."
        )
    if mask.dtype != torch.bool:
        raise SolverError(f"{name}: the mask must be boolean (True = kept), got {mask.dtype}.")
    check_int(name, "steps", steps, 0)
    if stats.in_features != weight_orig.shape[1]:
        raise SolverError(
            f"{name}: statistics are for {stats.in_features} inputs but the weight has {weight_orig.shape[1]}."
        )
    if not torch.isfinite(pruned).all() or not torch.isfinite(weight_orig).all():
        raise SolverError(f"{name}: masked_gd_refine got NaN or Inf weights.")
    if stats.xtx is None:
        raise SolverError(
            f"{name}: masked gradient refinement needs the input Hessian XᵀX; collect it (e.g. use a solver "
            "that needs the Hessian) or drop --refine."
        )
    h = layer_hessian(stats, weight_orig.shape[1], name, weight_orig.device)
    if lr is not None:
        check_number(name, "lr", lr, positive=True)
        check_lr(name, lr, lambda_max(h))
    with torch.no_grad():
        w0 = weight_orig.detach().to(F64)
        start = pruned.detach().to(F64).masked_fill(~mask, 0)
        out = masked_descent(w0, start, mask, h, steps, lr)
    return out.masked_fill(~mask, 0).to(pruned.dtype)


def masked_descent(w0: Tensor, w: Tensor, mask: Tensor, h: Tensor, steps: int, lr: float | None) -> Tensor:
    """Steepest descent on ``tr((W − W₀)H(W − W₀)ᵀ)`` restricted to ``mask``; float64."""
    m = mask.to(F64)
    w = w * m
    resid = (w - w0) @ h  # ΔH, kept up to date with one product per step
    for _ in range(steps):
        g = 2.0 * resid * m
        gh = g @ h
        if lr is None:
            num = g.square().sum(1)
            den = 2.0 * (gh * g).sum(1)
            alpha = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
        else:
            alpha = torch.full((w.shape[0],), lr, dtype=F64, device=w.device)
        w = w - alpha[:, None] * g
        resid = resid - alpha[:, None] * gh
    return w


def lambda_max(h: Tensor) -> float:
    """Largest eigenvalue of the symmetric ``h``."""
    return float(torch.linalg.eigvalsh(h)[-1])


def check_lr(name: str, lr: float | None, lmax: float) -> None:
    """Refuse a fixed step that could increase the loss (``lr > 1/λ_max``)."""
    if lr is not None and lr * lmax > 1.0 + 1e-9:
        raise ConfigError(
            f"{name}: lr={lr:g} exceeds 1/λ_max(H) = {1.0 / lmax:g}, so gradient steps could increase the loss; "
            "use a smaller lr or leave it unset for the exact line search."
        )
