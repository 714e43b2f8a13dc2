"""The helpers every Hessian-based solver shares: option checks, Hessian loading and the
unit-diagonal preconditioning (the loss in B = W·diag(d) with Ĥ equals the loss in W with H)."""
from __future__ import annotations

import math

import pytest
import torch

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers import LayerStats
from graphprune.solvers.base import check_int, check_number, layer_hessian, unit_diagonal

F64 = torch.float64


@pytest.mark.parametrize("value", [True, "1", None, math.nan, math.inf, -1.0])
def test_check_number_rejects_non_numbers_and_negatives(value):
    with pytest.raises(ConfigError, match="layer.q: damp must be a finite number >= 0"):
        check_number("layer.q", "damp", value)


def test_check_number_positive_bound_and_hint():
    check_number("w", "damp", 0)  # zero is fine for >= 0
    with pytest.raises(ConfigError, match=r"lr must be a finite number > 0, got 0; try 1e-3\."):
        check_number("w", "lr", 0, positive=True, hint="try 1e-3")


@pytest.mark.parametrize("value", [0, 1.0, True, "3"])
def test_check_int(value):
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        check_int("w", "steps", value, 1)
    check_int("w", "steps", 1, 1)


def test_layer_hessian_is_a_fresh_checked_copy():
    x = torch.randn(64, 6, dtype=F64)
    stats = LayerStats.from_inputs(x)
    h = layer_hessian(stats, 6, "w", torch.device("cpu"))
    torch.testing.assert_close(h, x.T @ x / 64)
    h.zero_()
    assert stats.xtx.abs().sum() > 0  # the statistics are untouched
    with pytest.raises(SolverError, match=r"shape \(6, 6\), expected \(5, 5\)"):
        layer_hessian(stats, 5, "w", torch.device("cpu"))
    bad = LayerStats(col_sq=stats.col_sq, count=64, xtx=stats.xtx.clone().fill_diagonal_(-1.0))
    with pytest.raises(SolverError, match="negative diagonal"):
        layer_hessian(bad, 6, "w", torch.device("cpu"))
    nan = LayerStats(col_sq=stats.col_sq, count=64, xtx=torch.full((6, 6), math.nan, dtype=F64))
    with pytest.raises(SolverError, match="NaN or Inf"):
        layer_hessian(nan, 6, "w", torch.device("cpu"))


def test_unit_diagonal_preserves_the_loss_and_keeps_dead_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=F64) * torch.linspace(0.1, 10.0, 8, dtype=F64)
    x[:, 3] = 0.0  # a dead input
    h = x.T @ x / 200
    hn, d, damp_abs = unit_diagonal(h.clone(), 0.0)
    assert damp_abs == 0.0
    assert d[3] == 1.0  # dead input keeps scale 1 instead of dividing by zero
    live = torch.arange(8) != 3
    torch.testing.assert_close(hn.diagonal()[live], torch.ones(7, dtype=F64))
    delta = torch.randn(5, 8, generator=g, dtype=F64)
    loss_w = torch.einsum("oi,ij,oj->", delta, h, delta)
    loss_b = torch.einsum("oi,ij,oj->", delta * d, hn, delta * d)
    torch.testing.assert_close(loss_b, loss_w)
    # Damping adds damp·mean(diag H) to the diagonal before scaling.
    hd, dd, damp_abs = unit_diagonal(h.clone(), 0.01)
    assert damp_abs == pytest.approx(0.01 * float(h.diagonal().mean()))
    torch.testing.assert_close(dd.square(), h.diagonal() + damp_abs)
    torch.testing.assert_close(hd.diagonal(), torch.ones(8, dtype=F64))
