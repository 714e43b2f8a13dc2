"""The solver contract: calibration statistics in, pruned weight and mask out.

Solvers are pure tensor functions (docs/ARCHITECTURE.md): no modules, no graph nodes, no
mutation of their inputs. Every solver has the signature::

    solve(weight: Tensor [out, in], stats: LayerStats, spec: SparsitySpec, **options) -> SolveResult

and is registered in :data:`graphprune.solvers.SOLVERS` with the statistics it needs,
so the observer pass collects only those.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers.spec import SparsitySpec


@dataclass
class LayerStats:
    """Statistics of one Linear's input ``X [tokens, in]`` (and optionally its gradients).

    Attributes:
        xtx: un-normalised Gram matrix ``XᵀX`` ``[in, in]`` (float64 accumulation), or None
            when the solver only needs column norms.
        col_sq: ``Σ_t x_tj²`` per input column ``[in]`` (the diagonal of ``XᵀX``).
        count: number of tokens accumulated.
        grad_sq: ``Σ_samples g²`` per weight ``[out, in]`` of the language-model loss
            (GBLM-Pruner), or None.
        col_sum: ``Σ_t x_tj`` per input column ``[in]`` (FLAP's mean), or None.
    """

    col_sq: Tensor
    count: int
    xtx: Tensor | None = None
    grad_sq: Tensor | None = None
    col_sum: Tensor | None = None

    @property
    def in_features(self) -> int:
        return int(self.col_sq.shape[0])

    def col_norms(self) -> Tensor:
        """``‖X_j‖₂`` per input column, float32."""
        return self.col_sq.clamp_min(0).sqrt().float()

    def hessian(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The mean Gram matrix ``XᵀX / count`` (the layer-wise Hessian up to a factor 2)."""
        if self.xtx is None:
            raise SolverError("this solver needs the input Hessian XᵀX, but only column norms were collected.")
        return (self.xtx / max(self.count, 1)).to(dtype)

    @classmethod
    def from_inputs(cls, x: Tensor, with_hessian: bool = True) -> "LayerStats":
        """Statistics of an explicit input matrix ``x [tokens, in]`` (tests, small cases)."""
        x64 = x.reshape(-1, x.shape[-1]).double()
        xtx = x64.T @ x64 if with_hessian else None
        return cls(col_sq=(x64 * x64).sum(0), count=x64.shape[0], xtx=xtx)


@dataclass
class SolveResult:
    """A pruned weight, its keep-mask (True = kept) and solver diagnostics."""

    weight: Tensor
    mask: Tensor
    info: dict[str, Any] = field(default_factory=dict)


class Solver(Protocol):
    def __call__(self, weight: Tensor, stats: LayerStats, spec: SparsitySpec, **options: Any) -> SolveResult: ...


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver and the statistics it needs."""

    name: str
    fn: Callable[..., SolveResult]
    needs_hessian: bool = False
    needs_grad: bool = False
    description: str = ""
    #: operators of graphprune's native library the solver uses when the library is
    #: loaded (it computes the same in Python otherwise); the prune pass loads it first.
    native_ops: tuple[str, ...] = ()


def check_inputs(weight: Tensor, stats: LayerStats, spec: SparsitySpec, name: str = "weight") -> None:
    """Shape and finiteness checks shared by every solver."""
    if weight.dim() != 2:
        raise SolverError(f"{name}: expected a 2-D weight [out, in], got shape {tuple(weight.shape)}.")
    if stats.in_features != weight.shape[1]:
        raise SolverError(
            f"{name}: statistics are for {stats.in_features} inputs but the weight has {weight.shape[1]}."
        )
    spec.check_shape(weight.shape, name)
    if not torch.isfinite(weight).all():
        raise SolverError(f"{name}: weight contains NaN or Inf; the model is corrupt or was loaded wrongly.")
    if not torch.isfinite(stats.col_sq).all() or (stats.xtx is not None and not torch.isfinite(stats.xtx).all()):
        raise SolverError(
            f"{name}: calibration statistics contain NaN or Inf; the activations overflowed, "
            "check the calibration data and the model's dtype (use float32)."
        )


def reconstruction_error(weight: Tensor, pruned: Tensor, xtx: Tensor) -> tuple[float, float]:
    """Layer-wise error ``‖WX − ŴX‖²`` from ``XᵀX``, absolute and relative to ``‖WX‖²``."""
    w = weight.double()
    delta = w - pruned.double()
    h = xtx.double()
    err = float(torch.einsum("oi,ij,oj->", delta, h, delta))
    ref = float(torch.einsum("oi,ij,oj->", w, h, w))
    return err, err / ref if ref > 0 else 0.0


def solve_result(weight: Tensor, pruned: Tensor, mask: Tensor, xtx: Tensor | None, **info: Any) -> SolveResult:
    """The tail every solver shares: the achieved sparsity, the layer-wise error when ``XᵀX`` is
    known (:func:`reconstruction_error` of ``pruned`` against ``weight``), and the result."""
    out: dict[str, Any] = {**info, "sparsity": 1.0 - mask.sum().item() / max(mask.numel(), 1)}
    if xtx is not None:
        out["error"], out["rel_error"] = reconstruction_error(weight.detach(), pruned, xtx.to(weight.device))
    return SolveResult(weight=pruned, mask=mask, info=out)


def prune_by_score(weight: Tensor, stats: LayerStats, spec: SparsitySpec, name: str, column_scale: Tensor | None = None) -> SolveResult:
    """Masks without a weight update: keep the largest ``|W_ij| · s_j`` (``s = 1`` without
    ``column_scale``) per ``spec``, zero the rest. Ranking runs in at least float32, since
    half-precision ties would make the mask depend on rounding."""
    check_inputs(weight, stats, spec, name)
    with torch.no_grad():
        w = weight.detach()
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        score = w.to(compute).abs()
        if column_scale is not None:
            score = score * column_scale.to(device=w.device, dtype=compute)
        mask = spec.keep_mask(score)
        pruned = w.masked_fill(~mask, 0)
    return solve_result(w, pruned, mask, stats.xtx)


def check_number(name: str, key: str, value: Any, *, positive: bool = False, hint: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite real number ``> 0`` (``positive``) or ``>= 0``."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{name}: {key} must be a finite number {bound}, got {value!r}{'; ' + hint if hint else ''}.")


def check_int(name: str, key: str, value: Any, low: int, *, hint: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: {key} must be an integer >= {low}, got {value!r}{'; ' + hint if hint else ''}.")


def layer_hessian(stats: LayerStats, cols: int, name: str, device: torch.device) -> Tensor:
    """A fresh float64 copy of ``XᵀX / count`` on ``device``, checked to be a ``[cols, cols]`` Gram matrix."""
    h = stats.hessian(torch.float64).to(device)
    if h.shape != (cols, cols):
        raise SolverError(
            f"{name}: the input Hessian XᵀX has shape {tuple(h.shape)}, expected ({cols}, {cols}); "
            "the statistics belong to a different layer."
        )
    if not bool(torch.isfinite(h).all()):
        raise SolverError(f"{name}: the input Hessian contains NaN or Inf; recollect the calibration statistics.")
    if bool((h.diagonal() < 0).any()):
        raise SolverError(
            f"{name}: the input Hessian XᵀX has negative diagonal entries, so it is not a Gram matrix; "
            "the calibration statistics are corrupt, recollect them."
        )
    return h  # XᵀX / count is computed anew, so the caller may modify it


def damp_diagonal(h: Tensor, damp: float) -> float:
    """Add ``damp · mean(diag h)`` to the diagonal of ``h`` in place; returns that amount."""
    damp_abs = damp * float(h.diagonal().mean())
    h.diagonal().add_(damp_abs)
    return damp_abs


def unit_diagonal(h: Tensor, damp: float) -> tuple[Tensor, Tensor, float]:
    """Damp ``h`` by ``damp · mean(diag h)`` and scale it to unit diagonal.

    With ``d = sqrt(diag H_damped)`` (1 for inputs that stay exactly zero) this returns
    ``(Ĥ, d, absolute damping)`` where ``Ĥ = H_damped / (d dᵀ)``. In the variables
    ``B = W · diag(d)`` the layer-wise loss ``tr((W − W₀) H (W − W₀)ᵀ)`` has Hessian ``Ĥ``,
    so ``|B|`` is the Wanda score and first-order methods see a better-conditioned problem.
    ``h`` is modified in place (the caller owns the copy from :func:`layer_hessian`).
    """
    damp_abs = damp_diagonal(h, damp)
    diag = h.diagonal()
    scale = torch.where(diag > 0, diag.sqrt(), torch.ones_like(diag))
    return h / scale[:, None] / scale[None, :], scale, damp_abs
