"""SparsitySpec: parsing, shape checks and exact masks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.errors import ConfigError
from graphprune.solvers.spec import SparsitySpec

# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("sparsity", "pattern", "message"),
    [
        (1.0, None, r"\[0, 1\)"),
        (1.5, "unstructured", r"\[0, 1\)"),
        (-0.1, None, r"\[0, 1\)"),
        (math.nan, None, r"\[0, 1\)"),
        (math.inf, None, r"\[0, 1\)"),
        (None, None, "needs --sparsity"),
        (None, "4:2", "0 < N < M"),
        (None, "0:4", "0 < N < M"),
        (None, "2:2", "0 < N < M"),
        (None, "2:0", "0 < N < M"),
        (None, "abc", "unknown sparsity pattern 'abc'.*'2:4'"),
        (None, "2:4:8", "unknown sparsity pattern"),
        (None, "-1:4", "unknown sparsity pattern"),
        (0.3, "2:4", "fixes sparsity at 0.5"),
    ],
)
def test_parse_rejects_bad_values_with_a_helpful_message(sparsity, pattern, message):
    with pytest.raises(ConfigError, match=message):
        SparsitySpec.parse(sparsity, pattern)


def test_constructor_rejects_half_an_nm_pattern_and_bad_nm():
    with pytest.raises(ConfigError, match="both N and M"):
        SparsitySpec(0.5, n=2)
    with pytest.raises(ConfigError, match="0 < N < M"):
        SparsitySpec(0.5, n=4, m=4)


@pytest.mark.parametrize(
    ("pattern", "n", "m", "sparsity"),
    [("2:4", 2, 4, 0.5), (" 4 : 8 ", 4, 8, 0.5), ("1:4", 1, 4, 0.75), ("3:4", 3, 4, 0.25)],
)
def test_parse_nm(pattern, n, m, sparsity):
    spec = SparsitySpec.parse(pattern=pattern)
    assert (spec.n, spec.m, spec.is_nm) == (n, m, True)
    assert spec.sparsity == pytest.approx(sparsity)
    assert spec.pattern == f"{n}:{m}"
    # a consistent explicit sparsity is accepted
    assert SparsitySpec.parse(sparsity, pattern) == spec


def test_parse_unstructured():
    spec = SparsitySpec.parse(0.6, " Unstructured ")
    assert spec == SparsitySpec(0.6)
    assert not spec.is_nm and spec.pattern == "unstructured"
    assert SparsitySpec.parse(0.0).sparsity == 0.0


def test_width_not_divisible_by_m_names_the_layer_and_the_fix():
    spec = SparsitySpec.parse(pattern="2:4")
    with pytest.raises(ConfigError, match=r"multiple of 4.*down_proj has 10 inputs.*unstructured"):
        spec.check_shape((8, 10), "down_proj")
    with pytest.raises(ConfigError, match="multiple of 4"):
        spec.keep_mask(torch.rand(3, 10))
    with pytest.raises(ConfigError, match="2-D"):
        spec.check_shape((8,))


def test_keep_mask_rejects_nan_scores():
    score = torch.rand(2, 8)
    score[1, 3] = math.nan
    with pytest.raises(ConfigError, match="NaN"):
        SparsitySpec(0.5).keep_mask(score)


# ----------------------------------------------------------------------------- masks


def test_keep_mask_per_row_keeps_the_largest_of_each_row():
    score = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0], [0.1, 0.5, 0.4, 0.3, 0.2]])
    mask = SparsitySpec(0.4).keep_mask(score)  # int(0.4 * 5) = 2 dropped per row
    expected = torch.tensor([[True, False, True, False, True], [False, True, True, True, False]])
    assert torch.equal(mask, expected)


def test_keep_mask_global_ranks_over_the_whole_tensor():
    score = torch.tensor([[5.0, 6.0, 7.0, 8.0], [0.1, 0.2, 0.3, 9.0]])
    mask = SparsitySpec(0.5).keep_mask(score, per_row=False)
    assert torch.equal(mask, torch.tensor([[False, True, True, True], [False, False, False, True]]))


def test_keep_mask_nm_keeps_n_largest_per_group():
    score = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    mask = SparsitySpec.parse(pattern="2:4").keep_mask(score)
    assert torch.equal(mask, torch.tensor([[False, True, True, False, True, False, False, True]]))


def test_check_mask_rejects_too_many_kept():
    spec = SparsitySpec.parse(pattern="2:4")
    with pytest.raises(ConfigError, match="exactly 2 of every 4"):
        spec.check_mask(torch.tensor([[True, True, True, False]]))
    spec.check_mask(torch.tensor([[True, False, True, False]]))


def _scores(seed: int, rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a coarse grid forces many ties: exact counts must survive them
    return torch.randint(0, 5, (rows, cols), generator=g).float()


@settings(max_examples=60, deadline=None)
@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (5, 16)]),
    rows=st.integers(1, 9),
    groups=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_mask_keeps_exactly_n_per_group_and_the_largest(nm, rows, groups, seed):
    n, m = nm
    spec = SparsitySpec.parse(pattern=f"{n}:{m}")
    score = _scores(seed, rows, groups * m)
    mask = spec.keep_mask(score)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()
    spec.check_mask(mask)
    grouped_score, grouped_mask = score.reshape(rows, groups, m), mask.reshape(rows, groups, m)
    kept_min = grouped_score.masked_fill(~grouped_mask, math.inf).amin(-1)
    dropped_max = grouped_score.masked_fill(grouped_mask, -math.inf).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert torch.equal(spec.keep_mask(score), mask)  # deterministic


@settings(max_examples=60, deadline=None)
@given(
    sparsity=st.floats(0.0, 0.99, allow_nan=False),
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_unstructured_mask_has_exact_sparsity(sparsity, rows, cols, seed):
    spec = SparsitySpec(sparsity)
    score = _scores(seed, rows, cols)

    per_row = spec.keep_mask(score)
    dropped = int(sparsity * cols)
    assert spec.prune_count(cols) == dropped
    assert ((~per_row).sum(1) == dropped).all()
    kept_min = score.masked_fill(~per_row, math.inf).amin(1)
    dropped_max = score.masked_fill(per_row, -math.inf).amax(1)
    assert (kept_min >= dropped_max).all()

    whole = spec.keep_mask(score, per_row=False)
    assert int((~whole).sum()) == int(sparsity * rows * cols)
    if (~whole).any() and whole.any():
        assert score[whole].min() >= score[~whole].max()
