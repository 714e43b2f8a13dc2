"""Wanda against a brute-force ranking of |W_ij|·‖X_j‖ from explicit inputs."""

from __future__ import annotations

import pytest
import torch
from brute import brute_force_keep

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers import LayerStats, SparsitySpec, get_solver
from graphprune.solvers.magnitude import magnitude_prune
from graphprune.solvers.wanda import wanda_prune


def _problem(rows: int = 10, cols: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs whose column scales span three orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.5, 1.5, cols)[torch.randperm(cols, generator=g)]
    return torch.randn(rows, cols, generator=g), torch.randn(80, cols, generator=g) * scales


def test_registered():
    assert get_solver("wanda").fn is wanda_prune


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_mask_is_the_per_row_ranking_of_the_wanda_score(sparsity):
    w, x = _problem()
    res = wanda_prune(w, LayerStats.from_inputs(x, with_hessian=False), SparsitySpec(sparsity))
    score = w.double().abs() * x.double().norm(dim=0)  # ‖X_j‖ straight from the inputs
    expected = brute_force_keep(score, int(sparsity * 24), 24)
    assert torch.equal(res.mask, expected)
    assert torch.equal(res.weight, torch.where(expected, w, torch.zeros_like(w)))
    # the test discriminates: activations change the choice compared with |W|
    assert not torch.equal(res.mask, magnitude_prune(w, LayerStats.from_inputs(x), SparsitySpec(sparsity)).mask)
    assert "error" not in res.info


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_mask_is_the_per_group_ranking_and_exact(pattern):
    w, x = _problem(cols=32)
    spec = SparsitySpec.parse(pattern=pattern)
    assert spec.n is not None and spec.m is not None
    res = wanda_prune(w, LayerStats.from_inputs(x), spec)
    score = w.double().abs() * x.double().norm(dim=0)
    assert torch.equal(res.mask, brute_force_keep(score, spec.m - spec.n, spec.m))
    assert (res.mask.reshape(10, -1, spec.m).sum(-1) == spec.n).all()
    assert (res.weight[~res.mask] == 0).all()


def test_optimal_among_per_row_masks_when_inputs_are_orthogonal():
    """With orthogonal input columns ‖(W−Ŵ)Xᵀ‖² = Σ_pruned w²‖X_j‖², so Wanda's mask is optimal:
    its error is the sum over rows of the k smallest (|w|·‖X_j‖)²."""
    g = torch.Generator().manual_seed(5)
    cols = 16
    q, _ = torch.linalg.qr(torch.randn(200, cols, generator=g, dtype=torch.float64))
    x = q * torch.logspace(-1, 1, cols, dtype=torch.float64)
    w = torch.randn(7, cols, generator=g, dtype=torch.float64)
    stats = LayerStats.from_inputs(x)
    res = wanda_prune(w, stats, SparsitySpec(0.5))
    best = (w * x.norm(dim=0)).square().sort(dim=1).values[:, :8].sum()
    assert res.info["error"] == pytest.approx(float(best), rel=1e-9)
    assert res.info["error"] < magnitude_prune(w, stats, SparsitySpec(0.5)).info["error"]


@pytest.mark.parametrize("shape", [(1, 8), (8, 4), (5, 8)])
def test_does_not_mutate_and_keeps_dtype(shape):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=g).to(torch.bfloat16)
    stats = LayerStats.from_inputs(torch.randn(20, shape[1], generator=g))
    saved = (w.clone(), stats.col_sq.clone(), stats.xtx.clone())  # type: ignore[union-attr]
    res = wanda_prune(w, stats, SparsitySpec.parse(pattern="2:4"))
    assert torch.equal(w, saved[0]) and torch.equal(stats.col_sq, saved[1]) and torch.equal(stats.xtx, saved[2])
    assert res.weight.dtype == torch.bfloat16
    assert torch.equal(res.weight, w.masked_fill(~res.mask, 0))
    assert torch.equal(wanda_prune(w, stats, SparsitySpec.parse(pattern="2:4")).mask, res.mask)


def test_dead_inputs_are_pruned_first():
    w, x = _problem()
    x[:, [3, 7]] = 0
    res = wanda_prune(w, LayerStats.from_inputs(x), SparsitySpec(0.1))  # int(2.4) = 2 per row
    assert not res.mask[:, [3, 7]].any() and res.mask.sum(1).eq(22).all()


def test_errors():
    w, x = _problem()
    stats = LayerStats.from_inputs(x)
    with pytest.raises(ConfigError, match="takes no options"):
        wanda_prune(w, stats, SparsitySpec(0.5), percdamp=0.1)
    with pytest.raises(SolverError, match="statistics are for 24 inputs but the weight has 20"):
        wanda_prune(w[:, :20], stats, SparsitySpec(0.5))
    bad = LayerStats(col_sq=stats.col_sq.clone(), count=stats.count)
    bad.col_sq[2] = float("inf")
    with pytest.raises(SolverError, match="calibration statistics contain NaN or Inf"):
        wanda_prune(w, bad, SparsitySpec(0.5))
