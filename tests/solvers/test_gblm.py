"""GBLM-Pruner against a brute-force ranking of |W|·‖X_j‖ + α|W|·sqrt(Σ g²)."""
from __future__ import annotations

import pytest
import torch
from brute import brute_force_keep

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers import LayerStats, SparsitySpec, get_solver
from graphprune.solvers.gblm import gblm_prune
from graphprune.solvers.wanda import wanda_prune


def _problem(rows: int = 10, cols: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight, inputs with column scales over three decades, and per-sample gradients."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.5, 1.5, cols)[torch.randperm(cols, generator=g)]
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(80, cols, generator=g) * scales
    grads = torch.randn(6, rows, cols, generator=g) * 0.05  # six calibration samples
    return w, x, grads


def _stats(x: torch.Tensor, grads: torch.Tensor | None) -> LayerStats:
    stats = LayerStats.from_inputs(x)
    if grads is not None:
        stats.grad_sq = grads.double().square().sum(0)
    return stats


def test_registered_as_needing_gradients():
    info = get_solver("gblm")
    assert info.fn is gblm_prune and info.needs_grad and not info.needs_hessian


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_zero_gradients_give_wandas_mask(sparsity):
    w, x, grads = _problem()
    res = gblm_prune(w, _stats(x, torch.zeros_like(grads)), SparsitySpec(sparsity))
    expected = brute_force_keep(w.double().abs() * x.double().norm(dim=0), int(sparsity * 24), 24)
    assert torch.equal(res.mask, expected)
    assert torch.equal(res.mask, wanda_prune(w, _stats(x, None), SparsitySpec(sparsity)).mask)
    assert torch.equal(res.weight, torch.where(expected, w, torch.zeros_like(w)))


@pytest.mark.parametrize("pattern", [None, "2:4", "1:4"])
def test_mask_is_the_ranking_of_the_gblm_score(pattern):
    w, x, grads = _problem(cols=32)
    spec = SparsitySpec.parse(0.5 if pattern is None else None, pattern)
    res = gblm_prune(w, _stats(x, grads), spec, alpha=100.0)
    # ‖G_ij‖₂ over samples, straight from the per-sample gradients
    score = w.double().abs() * x.double().norm(dim=0) + 100.0 * w.double().abs() * grads.double().norm(dim=0)
    drop, span = (16, 32) if pattern is None else (spec.m - spec.n, spec.m)  # type: ignore[operator]
    assert torch.equal(res.mask, brute_force_keep(score, drop, span))
    # the gradient term changes the choice compared with Wanda
    assert not torch.equal(res.mask, wanda_prune(w, _stats(x, None), spec).mask)
    assert res.info["alpha"] == 100.0 and "rel_error" in res.info


def test_large_gradients_keep_their_weights():
    w, x, grads = _problem()
    wanda_mask = wanda_prune(w, _stats(x, None), SparsitySpec(0.5)).mask
    chosen = ((~wanda_mask) & (w.abs() > 0.1)).nonzero()[::3]  # weights Wanda would prune (not ~0)
    boosted = torch.zeros_like(grads)
    boosted[:, chosen[:, 0], chosen[:, 1]] = 10.0
    res = gblm_prune(w, _stats(x, boosted), SparsitySpec(0.5))
    assert res.mask[chosen[:, 0], chosen[:, 1]].all()
    assert (res.mask.sum(1) == 12).all()


def test_samples_reproduces_the_reference_activation_scaling():
    w, x, grads = _problem()
    res = gblm_prune(w, _stats(x, grads), SparsitySpec(0.5), alpha=3.0, samples=6)
    act = (x.double().square().sum(0) / 6).sqrt()
    score = w.double().abs() * act + 3.0 * w.double().abs() * grads.double().norm(dim=0)
    assert torch.equal(res.mask, brute_force_keep(score, 12, 24))


def test_pure_and_checked():
    w, x, grads = _problem()
    stats = _stats(x, grads)
    before = (w.clone(), stats.grad_sq.clone())  # type: ignore[union-attr]
    gblm_prune(w, stats, SparsitySpec(0.5))
    assert torch.equal(w, before[0]) and torch.equal(stats.grad_sq, before[1])
    with pytest.raises(SolverError, match="GBLM needs gradient statistics; run the gradient pass"):
        gblm_prune(w, _stats(x, None), SparsitySpec(0.5))
    bad = _stats(x, grads)
    bad.grad_sq = bad.grad_sq[:, :5]  # type: ignore[index]
    with pytest.raises(SolverError, match="different layer"):
        gblm_prune(w, bad, SparsitySpec(0.5))
    nan = _stats(x, grads)
    nan.grad_sq[0, 0] = float("nan")  # type: ignore[index]
    with pytest.raises(SolverError, match="NaN"):
        gblm_prune(w, nan, SparsitySpec(0.5))
    with pytest.raises(ConfigError, match="alpha"):
        gblm_prune(w, stats, SparsitySpec(0.5), alpha=-1.0)
    with pytest.raises(ConfigError, match="samples"):
        gblm_prune(w, stats, SparsitySpec(0.5), samples=0)
    with pytest.raises(ConfigError, match="unknown option"):
        gblm_prune(w, stats, SparsitySpec(0.5), blocksize=3)
