"""Structured solvers: exact refits, greedy OBS against Wanda-sp and against brute force, the
local search, FLAP's bias compensation."""
from __future__ import annotations

import itertools

import pytest
import torch

from graphprune.errors import ConfigError
from graphprune.solvers.base import LayerStats
from graphprune.solvers.structured import flap, refit_kept, structured_error, structured_obs, swap_refine, wanda_sp


def _case(seed: int, tokens: int = 64, d: int = 10, out: int = 6) -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, d, generator=gen, dtype=torch.float64) @ mix + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    w = torch.randn(out, d, generator=gen, dtype=torch.float64)
    stats = LayerStats(col_sq=(x * x).sum(0), count=tokens, xtx=x.T @ x, col_sum=x.sum(0))
    return w, x, stats


def _best(w: torch.Tensor, x: torch.Tensor, keep: int) -> float:
    """Brute force: the least reconstruction error over every kept set."""
    errs = []
    for kept in itertools.combinations(range(w.shape[1]), keep):
        k = list(kept)
        sol = torch.linalg.lstsq(x[:, k], x @ w.T).solution  # [k, out]
        errs.append(float(((x @ w.T - x[:, k] @ sol) ** 2).sum()))
    return min(errs)


def test_the_refit_is_the_least_squares_solution() -> None:
    w, x, stats = _case(0)
    keep = torch.tensor([0, 2, 3, 7, 9])
    new = refit_kept(w, stats.xtx, keep)
    ref = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(new, ref, rtol=1e-7, atol=1e-8)
    err, rel = structured_error(w, keep, new, stats.xtx)
    direct = float(((x @ w.T - x[:, keep] @ new.T) ** 2).sum())
    assert err == pytest.approx(direct, rel=1e-8) and rel == pytest.approx(direct / float(((x @ w.T) ** 2).sum()), rel=1e-8)


@pytest.mark.parametrize("seed", range(6))
def test_obs_beats_wanda_sp_and_the_local_search_never_loses(seed: int) -> None:
    w, x, stats = _case(seed)
    keep = 6
    obs = structured_obs(w, stats, keep, damp=0.0)
    sp = wanda_sp(w, stats, keep)
    best = _best(w, x, keep)
    swapped = swap_refine(w, stats, obs, damp=0.0, swaps=20, candidates=10)
    assert obs.keep.tolist() == sorted(obs.keep.tolist()) and obs.keep.numel() == keep and obs.weight.shape == (6, keep)
    assert best <= swapped.info["error"] * (1 + 1e-9)
    assert swapped.info["error"] <= obs.info["error"] * (1 + 1e-12)
    assert obs.info["error"] <= sp.info["error"] * (1 + 1e-12)


def test_the_local_search_improves_greedy_obs_somewhere_and_reaches_the_optimum() -> None:
    """Over random cases the exchange search strictly improves greedy OBS in some, and ends at
    the brute-force optimum in more cases than greedy OBS alone."""
    better, optimal, greedy_optimal, cases = 0, 0, 0, 24
    for seed in range(cases):
        w, x, stats = _case(100 + seed, d=9, out=4)
        obs = structured_obs(w, stats, 4, damp=0.0)
        swapped = swap_refine(w, stats, obs, damp=0.0, swaps=30, candidates=9)
        best = _best(w, x, 4)
        better += swapped.info["error"] < obs.info["error"] * (1 - 1e-9)
        optimal += swapped.info["error"] <= best * (1 + 1e-9)
        greedy_optimal += obs.info["error"] <= best * (1 + 1e-9)
    assert better >= 1 and optimal > greedy_optimal, (better, optimal, greedy_optimal)


def test_wanda_sp_keeps_the_largest_scores_unchanged() -> None:
    w, _, stats = _case(1)
    score = w.abs().sum(0) * stats.col_sq.sqrt()
    sp = wanda_sp(w, stats, 4)
    assert set(sp.keep.tolist()) == set(score.argsort(descending=True)[:4].tolist())
    assert torch.equal(sp.weight, w[:, sp.keep])


def test_flap_moves_the_removed_mean_into_the_bias() -> None:
    """With the compensation, the layer's mean output over the calibration tokens is unchanged."""
    w, x, stats = _case(2)
    ch = flap(w, stats, 5)
    assert ch.bias_delta is not None
    full = (x @ w.T).mean(0)
    pruned = (x[:, ch.keep] @ ch.weight.T).mean(0) + ch.bias_delta
    torch.testing.assert_close(pruned, full, rtol=1e-9, atol=1e-9)
    direct = float(((x @ w.T - (x[:, ch.keep] @ ch.weight.T + ch.bias_delta)) ** 2).sum())
    assert ch.info["error"] == pytest.approx(direct, rel=1e-8)  # the error counts the compensation
    mean = x.mean(0)
    var = (x * x).mean(0) - mean * mean
    score = var * (w * w).sum(0)
    assert set(ch.keep.tolist()) == set(score.argsort(descending=True)[:5].tolist())


def test_keep_out_of_range_is_refused() -> None:
    w, _, stats = _case(3)
    with pytest.raises(ConfigError, match="cannot keep 0 of 10"):
        structured_obs(w, stats, 0)


# ---- units: attention heads (several columns that go together) and their KV groups ----


def _unit_error(w: torch.Tensor, x: torch.Tensor, cols: list[int]) -> float:
    sol = torch.linalg.lstsq(x[:, cols], x @ w.T).solution
    return float(((x @ w.T - x[:, cols] @ sol) ** 2).sum())


def test_removing_one_unit_is_exact_against_brute_force() -> None:
    """With one unit to go, OBS's unit cost tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ) is the exact error of removing
    it with the best refit: the chosen unit is the brute-force best and its error is the minimum."""
    w, x, stats = _case(4, d=12)
    units = torch.arange(12).view(4, 3)
    got = structured_obs(w, stats, 3, units=units, damp=0.0)
    errs = [_unit_error(w, x, [c for v in range(4) if v != u for c in units[v].tolist()]) for u in range(4)]
    best = min(range(4), key=errs.__getitem__)
    assert sorted(got.info["kept_units"]) == [u for u in range(4) if u != best]
    assert got.keep.tolist() == sorted(c for u in got.info["kept_units"] for c in units[u].tolist())
    assert got.info["error"] == pytest.approx(errs[best], rel=1e-6)


def test_units_keep_whole_heads_and_each_kv_group_keeps_as_many() -> None:
    """Six 2-column heads in three KV groups, keep 3: one head per group, whichever solver."""
    w, x, stats = _case(5, d=12)
    units = torch.arange(12).view(6, 2)
    parents = torch.arange(6) // 2
    for solve in (structured_obs, wanda_sp, flap):
        got = solve(w, stats, 3, units=units, parents=parents)
        kept = got.info["kept_units"]
        assert sorted(parents[kept].tolist()) == [0, 1, 2], solve.__name__
        assert got.keep.tolist() == sorted(c for u in kept for c in units[u].tolist())
        assert got.weight.shape == (w.shape[0], 6)
    with pytest.raises(ConfigError, match="evenly"):
        structured_obs(w, stats, 4, units=units, parents=parents)


def test_unit_obs_beats_unit_wanda_sp_and_the_local_search_never_loses() -> None:
    """On heads, OBS's error is at most Wanda-sp's (same kept count); the swap search over
    units of the same KV group is at most OBS's and keeps the group quota; both are at least
    the brute-force optimum over quota-respecting choices."""
    w, x, stats = _case(6, d=16, tokens=96)
    units = torch.arange(16).view(8, 2)
    parents = torch.arange(8) // 4
    obs = structured_obs(w, stats, 4, units=units, parents=parents, damp=0.0)
    sp = wanda_sp(w, stats, 4, units=units, parents=parents)
    swap = swap_refine(w, stats, obs, units=units, parents=parents, damp=0.0, candidates=8)
    assert obs.info["error"] <= sp.info["error"]
    assert swap.info["error"] <= obs.info["error"] * (1 + 1e-9)
    assert sorted(parents[swap.info["kept_units"]].tolist()) == [0, 0, 1, 1]
    best = min(
        _unit_error(w, x, [c for u in (*a, *b) for c in units[u].tolist()])
        for a in itertools.combinations(range(4), 2)
        for b in itertools.combinations(range(4, 8), 2)
    )
    assert swap.info["error"] >= best * (1 - 1e-6)
