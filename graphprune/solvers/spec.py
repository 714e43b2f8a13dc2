"""Sparsity targets and patterns: the one place that knows how a score becomes a mask.

A :class:`SparsitySpec` says how much of a weight ``W [out, in]`` to prune and in
which pattern:

* ``unstructured``: a fraction ``sparsity`` of the weights is set to zero. By
  default the ranking is per output row (every row loses the same count, as in
  Wanda); solvers that rank over a whole block (SparseGPT) pass ``per_row=False``.
* ``N:M``: in every group of ``M`` consecutive input columns of each row, exactly
  ``N`` weights are **kept** (NVIDIA's reading: 2:4 keeps 2 of every 4, so 50 %
  sparsity). ``M`` must divide the input width.

Masks are boolean *keep*-masks (``True`` = weight survives). Ties are broken by
position (``torch.topk`` is deterministic on CPU for a given input), so a mask is a
pure function of the score.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from graphprune.errors import ConfigError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsitySpec:
    """How much to prune and in which pattern.

    Attributes:
        sparsity: fraction of zeros in [0, 1). For ``N:M`` it is ``1 - N/M``.
        n: weights kept per group (``N:M`` only).
        m: group length along the input dimension (``N:M`` only).
    """

    sparsity: float
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.n is None) != (self.m is None):
            raise ConfigError("N:M needs both N and M; pass a pattern such as '2:4'.")
        if self.n is not None:
            assert self.m is not None
            if not (0 < self.n < self.m):
                raise ConfigError(
                    f"invalid N:M pattern {self.n}:{self.m}: N (kept per group) must satisfy "
                    f"0 < N < M; use e.g. '2:4' or '4:8'."
                )
        if self.n is not None and abs(float(self.sparsity) - (1.0 - self.n / self.m)) > 1e-9:  # type: ignore[operator]
            raise ConfigError(
                f"pattern {self.n}:{self.m} means sparsity {1.0 - self.n / self.m:g}, not {self.sparsity}; "  # type: ignore[operator]
                "use SparsitySpec.parse(None, 'N:M')."
            )
        if not isinstance(self.sparsity, (int, float)) or not math.isfinite(self.sparsity):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        if not (0.0 <= float(self.sparsity) < 1.0):
            raise ConfigError(
                f"sparsity must be in [0, 1), got {self.sparsity}; e.g. --sparsity 0.5 prunes half the weights."
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, sparsity: float | None = None, pattern: str | None = None) -> "SparsitySpec":
        """Build a spec from CLI-style values.

        Args:
            sparsity: fraction of zeros; ignored (but checked for consistency) for N:M.
            pattern: ``"unstructured"`` (default) or ``"N:M"``.
        """
        pattern = (pattern or "unstructured").strip().lower()
        if pattern == "unstructured":
            if sparsity is None:
                raise ConfigError("unstructured pruning needs --sparsity (a fraction in [0, 1)).")
            return cls(float(sparsity))
        match = _NM.match(pattern)
        if not match:
            raise ConfigError(
                f"unknown sparsity pattern {pattern!r}; use 'unstructured' or 'N:M' such as '2:4'."
            )
        n, m = int(match.group(1)), int(match.group(2))
        if m <= 0 or not (0 < n < m):
            raise ConfigError(
                f"invalid N:M pattern {n}:{m}: N (kept per group) must satisfy 0 < N < M; use e.g. '2:4'."
            )
        implied = 1.0 - n / m
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise ConfigError(
                f"pattern {n}:{m} fixes sparsity at {implied:g}, but sparsity {sparsity} was also given; "
                f"drop --sparsity or make it {implied:g}."
            )
        return cls(implied, n, m)

    # ------------------------------------------------------------------ queries
    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def __str__(self) -> str:
        return self.pattern if self.is_nm else f"{self.sparsity:g} unstructured"

    def check_shape(self, shape: tuple[int, ...] | torch.Size, name: str = "weight") -> None:
        """Raise :class:`ConfigError` if this pattern cannot apply to a weight of ``shape``."""
        if len(shape) != 2:
            raise ConfigError(f"{name} has shape {tuple(shape)}; sparsity patterns apply to 2-D [out, in] weights.")
        if self.is_nm and shape[1] % self.m:  # type: ignore[operator]
            raise ConfigError(
                f"{self.pattern} needs the input width to be a multiple of {self.m}, but {name} has "
                f"{shape[1]} inputs; use --pattern unstructured or exclude this layer."
            )

    def prune_count(self, width: int) -> int:
        """Zeros per row of ``width`` inputs for unstructured pruning (rounded down)."""
        # round away float noise first: 0.29 * 100 is 28.999999999999996 and must prune 29
        return int(math.floor(round(self.sparsity * width, 9)))

    # ------------------------------------------------------------------ masks
    def keep_mask(self, score: Tensor, per_row: bool = True) -> Tensor:
        """Boolean keep-mask with the pattern's exact sparsity; the highest scores survive.

        Args:
            score: ``[out, in]`` importance (higher = more important). NaN is rejected.
            per_row: unstructured only; rank within each row (True) or over the whole
                tensor (False). N:M always ranks within each group.
        """
        self.check_shape(score.shape, "score")
        if torch.isnan(score).any():
            raise ConfigError("the importance score contains NaN; check the weights and calibration statistics.")
        rows, cols = score.shape
        mask = torch.ones_like(score, dtype=torch.bool)
        if self.is_nm:
            m, n = self.m, self.n
            assert m is not None and n is not None
            groups = score.reshape(rows, cols // m, m)
            drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
            mask = mask.reshape(rows, cols // m, m)
            mask.scatter_(-1, drop, False)
            return mask.reshape(rows, cols)
        if per_row:
            k = self.prune_count(cols)
            if k:
                drop = torch.topk(score, k, dim=1, largest=False).indices
                mask.scatter_(1, drop, False)
            return mask
        k = self.prune_count(score.numel())
        if k:
            drop = torch.topk(score.flatten(), k, largest=False).indices
            mask.view(-1)[drop] = False
        return mask

    def check_mask(self, mask: Tensor, name: str = "weight") -> None:
        """Raise if ``mask`` violates the pattern (used by tests and the prune pass)."""
        if self.is_nm:
            m, n = self.m, self.n
            assert m is not None and n is not None
            per_group = mask.reshape(mask.shape[0], -1, m).sum(-1)
            if bool(per_group.ne(n).any()):
                raise ConfigError(f"{name}: mask does not keep exactly {n} of every {m} weights.")
        else:
            k = self.prune_count(mask.shape[1])
            if ((~mask).sum(1) < k).any():
                raise ConfigError(f"{name}: some rows have fewer than {k} pruned weights for sparsity {self.sparsity:g}.")
