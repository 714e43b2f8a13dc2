"""ALPS against its definition: exact patterns, the closed-form least-squares refit on a
fixed support (PCG), the orthogonal-input case where the optimum is known, and the
layer-wise error compared with magnitude / Wanda / SparseGPT on correlated inputs."""
from __future__ import annotations

import math

import pytest
import torch

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers import LayerStats, SparsitySpec, get_solver
from graphprune.solvers.alps import alps_prune, pcg_refit
from graphprune.solvers.magnitude import magnitude_prune
from graphprune.solvers.sparsegpt import sparsegpt_prune
from graphprune.solvers.wanda import wanda_prune

F64 = torch.float64


def _correlated(rows: int, cols: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs X = Z·A with a random mixing A (strongly correlated columns)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols, generator=g, dtype=F64)
    a = torch.randn(cols, cols, generator=g, dtype=F64) / math.sqrt(cols)
    return torch.randn(rows, cols, generator=g), (z @ a).float()


def _err(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """‖WXᵀ − ŴXᵀ‖² straight from the inputs."""
    return float(((w.double() - pruned.double()) @ x.double().T).square().sum())


def _refit(w: torch.Tensor, mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Row-by-row least squares on the support: H_SS x_S = (H w)_S, solved directly."""
    w, h = w.double(), h.double()
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        s = mask[r].nonzero().flatten()
        if s.numel():
            out[r, s] = torch.linalg.solve(h[s][:, s], (h @ w[r])[s])
    return out


def test_registered():
    info = get_solver("alps")
    assert info.fn is alps_prune and info.needs_hessian


def test_pcg_reaches_the_closed_form_least_squares_optimum():
    w, x = _correlated(7, 24, 200, seed=1)
    h = LayerStats.from_inputs(x).hessian(F64)
    mask = torch.rand(7, 24, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[3] = False  # an empty row stays empty
    mask[4] = True  # a dense row is the identity
    refit, info = pcg_refit(w.double(), mask, h, tol=1e-14, max_iter=500)
    expected = _refit(w, mask, h)
    assert torch.allclose(refit, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    assert (refit[~mask] == 0).all()
    assert torch.allclose(refit[4], w[4].double(), atol=1e-9)
    assert info["residual"] < 1e-10
    # the refit is optimal for its support: never worse than merely masking
    assert _err(w, refit, x) <= _err(w, w * mask, x)


def test_pcg_does_not_touch_its_inputs_and_keeps_dtype():
    w, x = _correlated(4, 16, 64)
    h = LayerStats.from_inputs(x).hessian()
    mask = w.abs() > 0.5
    before = (w.clone(), mask.clone(), h.clone())
    out, _ = pcg_refit(w, mask, h)
    assert out.dtype == torch.float32 and out.shape == w.shape
    assert torch.equal(w, before[0]) and torch.equal(mask, before[1]) and torch.equal(h, before[2])
    with pytest.raises(SolverError, match="boolean mask"):
        pcg_refit(w, mask.float(), h)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_unstructured_budget_is_exact(sparsity):
    w, x = _correlated(24, 40, 160)
    res = alps_prune(w, LayerStats.from_inputs(x), SparsitySpec(sparsity))
    assert int(res.mask.sum()) == w.numel() - int(sparsity * w.numel())
    assert (res.weight[~res.mask] == 0).all()
    assert res.weight.dtype == w.dtype and res.mask.dtype == torch.bool
    per_row = alps_prune(w, LayerStats.from_inputs(x), SparsitySpec(sparsity), per_row=True)
    assert (per_row.mask.sum(1) == 40 - int(sparsity * 40)).all()


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_pattern_is_exact(pattern):
    spec = SparsitySpec.parse(pattern=pattern)
    assert spec.n is not None and spec.m is not None
    w, x = _correlated(16, 32, 128)
    res = alps_prune(w, LayerStats.from_inputs(x), spec)
    assert (res.mask.reshape(16, -1, spec.m).sum(-1) == spec.n).all()
    assert (res.weight[~res.mask] == 0).all()
    assert _err(w, res.weight, x) < _err(w, magnitude_prune(w, LayerStats.from_inputs(x), spec).weight, x)


def test_orthogonal_inputs_come_close_to_the_known_optimum():
    """With orthogonal input columns H is diagonal: the optimum keeps the globally largest
    w²·H_jj and leaves the kept weights unchanged. ADMM explores the support (its dual
    variable lifts weights just below the threshold), so it may swap a few weights at the
    threshold (it does here, costing a few per cent), but the refit keeps every kept weight."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(256, 32, generator=g, dtype=F64))
    scales = torch.logspace(-1, 1, 32, dtype=F64)[torch.randperm(32, generator=g)]
    x = q * scales
    w = torch.randn(12, 32, generator=g, dtype=F64)
    stats = LayerStats.from_inputs(x)
    res = alps_prune(w, stats, SparsitySpec(0.6))
    assert torch.allclose(res.weight, w * res.mask, atol=1e-8)  # diagonal H: refit = keep
    best = SparsitySpec(0.6).keep_mask(w.abs() * stats.hessian(F64).diagonal().sqrt(), per_row=False)
    assert int(res.mask.sum()) == int(best.sum())
    assert _err(w, res.weight, x) <= 1.15 * _err(w, w * best, x)
    assert (res.mask != best).sum() <= 0.05 * w.numel()


def test_beats_magnitude_wanda_and_sparsegpt_on_correlated_inputs():
    w, x = _correlated(48, 96, 384, seed=4)
    stats = LayerStats.from_inputs(x)
    spec = SparsitySpec(0.7)
    res = alps_prune(w, stats, spec)
    mag = magnitude_prune(w, stats, spec)
    alps_err = _err(w, res.weight, x)
    assert alps_err <= _err(w, mag.weight, x)
    # even the best weights on the magnitude mask (exact least-squares refit) are worse
    assert alps_err <= _err(w, _refit(w, mag.mask, stats.hessian(F64)), x)
    assert alps_err < 0.5 * _err(w, wanda_prune(w, stats, spec).weight, x)
    assert alps_err < _err(w, sparsegpt_prune(w, stats, spec).weight, x)
    assert res.info["rel_error"] == pytest.approx(alps_err / float((w.double() @ x.double().T).square().sum()))
    for key in ("iterations", "rho", "pcg_iterations", "error", "damp"):
        assert key in res.info
    fast = alps_prune(w, stats, spec, fast=True)
    assert int(fast.mask.sum()) == int(res.mask.sum())
    assert _err(w, fast.weight, x) < 0.5 * _err(w, wanda_prune(w, stats, spec).weight, x)


def test_pure_and_deterministic():
    w, x = _correlated(8, 16, 64)
    stats = LayerStats.from_inputs(x)
    w_before, xtx_before = w.clone(), stats.xtx.clone()  # type: ignore[union-attr]
    a = alps_prune(w, stats, SparsitySpec(0.5))
    b = alps_prune(w, stats, SparsitySpec(0.5))
    assert torch.equal(w, w_before) and torch.equal(stats.xtx, xtx_before)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


def test_errors_are_specific():
    w, x = _correlated(4, 8, 32)
    stats = LayerStats.from_inputs(x)
    with pytest.raises(SolverError, match="Hessian"):
        alps_prune(w, LayerStats.from_inputs(x, with_hessian=False), SparsitySpec(0.5))
    with pytest.raises(ConfigError, match="unknown option"):
        alps_prune(w, stats, SparsitySpec(0.5), blocksize=4)
    with pytest.raises(ConfigError, match="rho0"):
        alps_prune(w, stats, SparsitySpec(0.5), rho0=0)
    with pytest.raises(ConfigError, match="max_iter"):
        alps_prune(w, stats, SparsitySpec(0.5), max_iter=0)
    with pytest.raises(ConfigError, match="multiple of 4"):
        alps_prune(torch.randn(4, 6), LayerStats.from_inputs(torch.randn(32, 6)), SparsitySpec.parse(pattern="2:4"))
    with pytest.raises(SolverError, match="NaN"):
        alps_prune(torch.full((4, 8), float("nan")), stats, SparsitySpec(0.5))
    with pytest.raises(SolverError, match="zero"):
        alps_prune(w, LayerStats.from_inputs(torch.zeros(32, 8)), SparsitySpec(0.5))


def test_sampled_threshold_selects_exactly_the_largest():
    """The bracketed selection keeps exactly the ``keep`` largest entries, the lowest flat
    index first among ties, whether the sample's bracket holds the threshold or not."""
    from graphprune.solvers.alps import _global_top

    g = torch.Generator().manual_seed(5)
    score = torch.randn(300, 700, generator=g).abs()
    score[7, :50] = score[7, 0]  # a run of ties
    sample = torch.randint(score.numel(), (4096,), generator=g)
    for keep in (1, 1000, score.numel() // 2, score.numel() - 1):
        mask = _global_top(score, keep, sample)
        assert int(mask.sum()) == keep
        assert float(score[mask].min()) >= float(score[~mask].max())
    # the threshold sits inside the tie run: the earliest of the tied entries are kept
    order = score.flatten().argsort(descending=True, stable=True)
    keep = int((score.flatten() > score[7, 0]).sum()) + 20
    mask = _global_top(score, keep, sample)
    expected = torch.zeros(score.numel(), dtype=torch.bool)
    expected[order[:keep]] = True
    assert torch.equal(mask.flatten(), expected)
    # a sample that brackets nothing useful (all from one tiny corner) still gives the exact answer
    corner = torch.zeros(4096, dtype=torch.long)
    assert torch.equal(_global_top(score, keep, corner), mask)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_group_ranking_keeps_the_largest_of_each_group(n, m):
    from graphprune.solvers.alps import _nm_top

    g = torch.Generator().manual_seed(6)
    score = torch.randn(33, 8 * m, generator=g).abs()
    score[0, :m] = 1.0  # an all-tied group keeps its first n
    mask = _nm_top(score, n, m)
    groups, kept = score.reshape(33, -1, m), mask.reshape(33, -1, m)
    assert (kept.sum(-1) == n).all()
    low_kept = torch.where(kept, groups, torch.full_like(groups, float("inf"))).amin(-1)
    high_dropped = torch.where(kept, torch.full_like(groups, -1.0), groups).amax(-1)
    assert (low_kept >= high_dropped).all()
    assert kept[0, 0, :n].all() and not kept[0, 0, n:].any()


def test_pcg_loss_stop_reports_the_loss_it_removed():
    """The loss watch is exact bookkeeping: the fraction of the layer loss the refit
    removed, as reported, equals the fraction measured from the weights; and stopping on
    it lands within a hair of the fully converged refit."""
    from graphprune.solvers.alps import _pcg

    w, x = _correlated(16, 48, 400, seed=7)
    h = LayerStats.from_inputs(x).hessian(F64)
    mask = torch.rand(16, 48, generator=torch.Generator().manual_seed(8)) < 0.5
    start = w.double() * mask

    def loss(z: torch.Tensor) -> float:
        d = z - w.double()
        return float((d @ h * d).sum())

    out, info = _pcg(h, w.double(), mask, start, 1e-300, 500, 1e-5)
    assert info["loss_change"] == pytest.approx((loss(start) - loss(out)) / loss(start), rel=1e-9)
    assert 0 < info["iterations"] < 500
    best, _ = pcg_refit(w.double(), mask, h, tol=1e-13, max_iter=500)
    assert loss(best) <= loss(out) <= loss(best) * (1 + 1e-4)


def test_linears_sharing_statistics_share_one_eigendecomposition(monkeypatch):
    w, x = _correlated(6, 32, 200, seed=9)  # wide (out < in/4): the eigenbasis updates
    stats = LayerStats.from_inputs(x)
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a.shape) or real(a))
    first = alps_prune(w, stats, SparsitySpec(0.5))
    second = alps_prune(w[:5], stats, SparsitySpec(0.5))  # another Linear on the same input
    assert len(calls) == 1
    fresh = alps_prune(w[:5], LayerStats.from_inputs(x), SparsitySpec(0.5))
    assert len(calls) == 2 and torch.equal(second.weight, fresh.weight)
    assert first.weight.shape == w.shape
    stats.xtx.mul_(2)  # type: ignore[union-attr]  # changed statistics are prepared anew
    alps_prune(w, stats, SparsitySpec(0.5))
    assert len(calls) == 3


def test_both_admm_updates_solve_the_same_linear_system():
    """The eigenbasis and the Cholesky updates both give ``(B₀Ĥ + U)(Ĥ + ρI)⁻¹``, checked
    against a float64 direct solve at several ρ (the Cholesky factor is redone on change)."""
    from graphprune.solvers.alps import _CholeskyUpdate, _EigenUpdate, _Prepared

    g = torch.Generator().manual_seed(10)
    x = torch.randn(300, 40, generator=g, dtype=F64) @ torch.randn(40, 40, generator=g, dtype=F64)
    h = x.T @ x / 300
    d = h.diagonal().sqrt()
    hn = h / d[:, None] / d[None, :] + 0.01 * torch.eye(40, dtype=F64)
    b0 = torch.randn(50, 40, generator=g, dtype=F64)
    evals, q = torch.linalg.eigh(hn)
    eig, chol = _EigenUpdate(b0, evals, q), _CholeskyUpdate(b0, _Prepared(hn, torch.ones(40, dtype=F64), 0.0))
    for rho in (0.1, 0.13, 0.13, 2.0):
        u = torch.randn(50, 40, generator=g, dtype=F64)
        exact = torch.linalg.solve(hn + rho * torch.eye(40, dtype=F64), (b0 @ hn + u).T).T
        assert torch.allclose(eig(u.clone(), rho), exact, atol=1e-9)
        assert torch.allclose(chol(u.clone(), rho), exact, atol=1e-9)
    assert chol.fallback is None
    # a matrix the factorisation refuses (an eigenvalue below -ρ) switches to the eigenbasis route
    bad = torch.diag(torch.tensor([1.0, 0.5, -1e-3], dtype=F64))
    odd = _CholeskyUpdate(b0[:, :3], _Prepared(bad, torch.ones(3, dtype=F64), 0.0))
    u = torch.randn(50, 3, generator=g, dtype=F64)
    out = odd(u.clone(), 1e-4)
    assert odd.fallback is not None
    ev, vecs = torch.linalg.eigh(bad)
    assert torch.allclose(out, _EigenUpdate(b0[:, :3], ev.clamp_min(0), vecs)(u.clone(), 1e-4))  # spectrum clamped at 0
    assert torch.isfinite(odd(u.clone(), 2e-4)).all()  # and it stays on that route


def test_tall_and_wide_weights_prune_alike():
    """A tall weight (Cholesky updates) and its rows taken as a wide weight's (eigen
    updates) face the same per-row problems with N:M: the same masks up to a few ties."""
    w, x = _correlated(160, 32, 400, seed=11)
    stats = LayerStats.from_inputs(x)
    spec = SparsitySpec.parse(pattern="2:4")
    tall = alps_prune(w, stats, spec)
    wide = torch.cat([alps_prune(w[i:i + 7], stats, spec).mask for i in range(0, 160, 7)])  # 7 < 32/4 rows each
    assert (tall.mask.reshape(160, -1, 4).sum(-1) == 2).all()
    assert (tall.mask != wide).float().mean() < 0.05
