"""Magnitude pruning against a brute-force ranking of |W|."""

from __future__ import annotations

import pytest
import torch

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers import LayerStats, SparsitySpec, get_solver
from graphprune.solvers.magnitude import magnitude_prune


def _brute_force_keep(score: torch.Tensor, drop_per_row: int, group: int | None = None) -> torch.Tensor:
    """Keep-mask by sorting each row (or each group of ``group`` columns) in Python."""
    rows, cols = score.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    span = group or cols
    for r in range(rows):
        for start in range(0, cols, span):
            order = sorted(range(start, start + span), key=lambda j: float(score[r, j]))
            for j in order[:drop_per_row]:
                keep[r, j] = False
    return keep


def _problem(rows: int = 12, cols: int = 32, seed: int = 0) -> tuple[torch.Tensor, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g), LayerStats.from_inputs(torch.randn(64, cols, generator=g))


def test_registered():
    assert get_solver("magnitude").fn is magnitude_prune


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_mask_is_the_per_row_ranking_of_abs_weight(sparsity):
    w, stats = _problem()
    res = magnitude_prune(w, stats, SparsitySpec(sparsity))
    expected = _brute_force_keep(w.abs(), int(sparsity * w.shape[1]))
    assert torch.equal(res.mask, expected)
    assert torch.equal(res.weight, torch.where(expected, w, torch.zeros_like(w)))
    assert res.info["sparsity"] == pytest.approx(int(sparsity * 32) / 32)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_mask_is_the_per_group_ranking(pattern):
    w, stats = _problem()
    spec = SparsitySpec.parse(pattern=pattern)
    assert spec.m is not None and spec.n is not None
    res = magnitude_prune(w, stats, spec)
    assert torch.equal(res.mask, _brute_force_keep(w.abs(), spec.m - spec.n, spec.m))
    assert (res.mask.reshape(12, -1, spec.m).sum(-1) == spec.n).all()


def test_reported_error_is_the_reconstruction_error():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    res = magnitude_prune(w, LayerStats.from_inputs(x), SparsitySpec(0.5))
    explicit = float(((w - res.weight).double() @ x.double().T).square().sum())
    assert res.info["error"] == pytest.approx(explicit, rel=1e-9)
    # no Hessian, no error report
    assert "error" not in magnitude_prune(w, LayerStats.from_inputs(x, with_hessian=False), SparsitySpec(0.5)).info


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8), (8, 1), (5, 8)])
def test_keeps_dtype_and_does_not_mutate(dtype, shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g).to(dtype)
    stats = LayerStats.from_inputs(torch.randn(20, shape[1], generator=g))
    before_w, before_h = w.clone(), stats.xtx.clone()  # type: ignore[union-attr]
    res = magnitude_prune(w, stats, SparsitySpec(0.5))
    assert torch.equal(w, before_w) and torch.equal(stats.xtx, before_h)
    assert res.weight.dtype == dtype and res.mask.dtype == torch.bool
    assert (res.weight[~res.mask] == 0).all()
    assert torch.equal(res.weight[res.mask], w[res.mask])
    assert res.weight.data_ptr() != w.data_ptr()


def test_errors():
    w, stats = _problem()
    with pytest.raises(ConfigError, match="takes no options"):
        magnitude_prune(w, stats, SparsitySpec(0.5), blocksize=4)
    with pytest.raises(SolverError, match="statistics are for 32 inputs but the weight has 31"):
        magnitude_prune(w[:, :31], stats, SparsitySpec(0.5))
    with pytest.raises(ConfigError, match="multiple of 8.*q_proj"):
        magnitude_prune(
            w[:, :28], LayerStats.from_inputs(torch.randn(4, 28)), SparsitySpec.parse(pattern="4:8"), name="q_proj"
        )
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SolverError, match="NaN or Inf"):
        magnitude_prune(bad, stats, SparsitySpec(0.5))
    with pytest.raises(SolverError, match="2-D"):
        magnitude_prune(w[0], stats, SparsitySpec(0.5))
