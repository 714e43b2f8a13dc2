"""ALPS (Meng, Behdin, Wang, Mazumder 2024, "ALPS: Improved Optimization for Highly
Sparse One-Shot Pruning").

Problem: for a Linear ``W [out, in]`` with inputs ``X`` and ``H = XᵀX / n``, find ``Ŵ``
in the sparsity pattern minimising ``Σ_r (ŵ_r − w_r) H (ŵ_r − w_r)ᵀ`` (the layer-wise
error ``‖WX − ŴX‖² / n``), an ℓ0-constrained least-squares problem.

Method, in three parts:

1. **Preconditioning.** ``H`` is damped by ``damp · mean(diag H)`` on the diagonal
   (default 1 %, as in the paper's code; it keeps ``H`` invertible when inputs are
   collinear or dead) and scaled to unit diagonal: with ``d = sqrt(diag H_damped)``,
   ``Ĥ = H_damped / (d dᵀ)`` and the variables are ``B = W · diag(d)``. The problem is
   unchanged, but ρ now has a scale-free meaning, and ``|B_ij| = |W_ij| · ‖X_j‖`` (up to
   damping), so the projection ranks weights by the Wanda score.
2. **ADMM** on the split ``B = D`` with ``D`` in the pattern (scaled dual ``V``)::

       B ← (B₀Ĥ − V + ρD)(Ĥ + ρI)⁻¹     one eigendecomposition Ĥ = QΛQᵀ serves every ρ:
                                          B = [(B₀Q)Λ + (ρD − V)Q] / (Λ + ρ) · Qᵀ
                                          (two products with Q), or two triangular
                                          solves with the Cholesky factor of Ĥ + ρI:
                                          half the multiply-adds, plus a new factor
                                          (in³/3) whenever ρ changes. The factor wins
                                          unless the weight is very wide, and is used
                                          when out >= in/4 (measured per iteration
                                          on the default model: 0.6x the eigen route's
                                          time at 1536x576, 0.9x at 576x1536, a tie at
                                          576x576 and 192x576); the eigendecomposition
                                          is then never computed
       D ← Π(B + V/ρ)                     projection: keep the largest |·| (pattern)
       V ← V + ρ(B − D)

   Every ``update_every`` (3) iterations the support of ``D`` is compared with the one 3
   iterations earlier; with ``s`` = flipped positions / kept weights, ρ follows the
   paper's reference schedule: ``s > 0.1`` → ρ·1.3; ``s > 0.005`` → ρ·1.2; some change
   → ρ·1.1 once the support has started moving, otherwise (ρ too large to let the
   support move at all) ρ/5 and restart from the initial point; no change → stop once
   the support has moved before, otherwise ρ/5. ρ is capped at 1e6. After
   ``switch_iter`` iterations the run also stops when ``s < 3e-4``. Unlike the reference
   code, the ρ/5 back-off is applied at most ``_MAX_BACKOFFS`` times: when the
   magnitude support is already stationary (e.g. uncorrelated inputs) the reference
   would shrink ρ until ``max_iter``; here the support is then accepted as final.
3. **PCG refinement.** The final support is that of the projected ``B``; on it the
   layer loss is minimised by batched preconditioned conjugate gradients
   (:func:`pcg_refit`, Jacobi preconditioner, every row at once, no inverse), started
   from the ADMM weights. It stops by measured convergence: when every row's residual
   is below ``pcg_tol`` of its right-hand side, or when two iterations in a row have
   each lowered the layer loss by less than ``pcg_loss_tol`` (1e-5) of what it still
   is. Started from ADMM's point the refit removes about 0.1 % of the loss in all; on
   the default model's Linears the loss stop comes after 10-20 iterations.

Unstructured sparsity is a per-layer budget (the paper's ℓ0 constraint: rows may keep
different counts); ``per_row=True`` gives every row the same count instead. ``N:M``
projects within each group of ``M`` inputs.

Numerics: the Hessian is accumulated, damped and scaled in float64; its
eigendecomposition, ADMM and the PCG refinement run in float32 (float64 for a float64
weight): ADMM because only its support matters (the float32 eigenvectors are
orthonormal to ~2e-6, and on the default model's Linears the final layer errors match
a float64 decomposition's to within 0.02 %), PCG
because its answer is stored in the weight's own precision and its stop watches the
loss rather than a residual below float32's resolution.

Linears that read the same input (q/k/v, gate/up) are handed one statistics object;
the damped unit-diagonal Hessian and its eigendecomposition are computed once for
them (:class:`_Prepared`, a one-entry cache tied to that object's lifetime).
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers.base import LayerStats, SolveResult, check_inputs, check_int, check_number, layer_hessian, solve_result, unit_diagonal
from graphprune.solvers.spec import SparsitySpec

log = logging.getLogger(__name__)

_RHO_MAX = 1e6
# How often ρ may be divided by 5 because the support does not move, before the
# support is accepted as it is.
_MAX_BACKOFFS = 4

# (max_iter, pcg_iters, pcg_tol, switch_iter, stop_change) for default and fast mode.
_DEFAULTS = {False: (300, 50, 1e-6, 30, 3e-4), True: (90, 10, 1e-4, 12, 3e-3)}
#: PCG's convergence stop: two iterations in a row each lowering the layer loss by less than
#: this fraction of what remains (ALPS's refit, and the proximal solver's).
PCG_LOSS_TOL = 1e-5


def alps_prune(
    weight: Tensor,
    stats: LayerStats,
    spec: SparsitySpec,
    rho0: float = 0.1,
    fast: bool = False,
    max_iter: int | None = None,
    pcg_iters: int | None = None,
    *,
    damp: float = 0.01,
    update_every: int = 3,
    pcg_tol: float | None = None,
    pcg_loss_tol: float = PCG_LOSS_TOL,
    per_row: bool = False,
    name: str = "weight",
    **options: Any,
) -> SolveResult:
    """Prune ``weight [out, in]`` with ALPS (ADMM with a ρ schedule, then PCG).

    Args:
        weight: the Linear's weight ``[out, in]``; not modified.
        stats: calibration statistics; ``stats.xtx [in, in]`` is required.
        spec: sparsity target and pattern.
        rho0: initial ADMM penalty, relative to the unit-diagonal Hessian.
        fast: fewer ADMM iterations, a looser support-stability stop and a short PCG
            (10 iterations, tolerance 1e-4, as in the paper's code).
        max_iter: ADMM iteration cap (default 300; 90 when ``fast``).
        pcg_iters: PCG iteration cap (default 50; 10 when ``fast``; 0 skips PCG and
            keeps the ADMM weights on the final support).
        damp: Hessian damping as a fraction of ``mean(diag H)``.
        update_every: iterations between support checks / ρ updates.
        pcg_tol: PCG stop when every row's residual is below ``pcg_tol`` times its
            right-hand side (default 1e-6; 1e-4 when ``fast``).
        pcg_loss_tol: PCG also stops once two consecutive iterations have each lowered
            the layer loss by less than this fraction of it (0 = residual stop only).
        per_row: unstructured only; same count per row instead of a layer budget.
        name: how errors refer to this weight (e.g. the module path).
        **options: none other are accepted; an unknown option is a :class:`ConfigError`.

    Returns:
        ``SolveResult`` with the pruned weight (dtype and device of ``weight``, exactly
        zero off the mask), the boolean keep-mask, and ``info``: ``iterations`` (ADMM),
        ``rho`` (final), ``support_change`` (last measured fraction), ``backoffs``,
        ``pcg_iterations``, ``pcg_residual`` (max relative), ``pcg_loss_change`` (the
        fraction of the layer loss the refit removed), ``damp`` (absolute),
        ``sparsity`` (achieved), ``error`` / ``rel_error`` (undamped ``‖WX − ŴX‖²``).

    Raises:
        ConfigError: bad option values or an unknown option.
        SolverError: missing or malformed ``XᵀX``, or inputs that are all zero.
    """
    if options:
        raise ConfigError(
            f"{name}: alps_prune got unknown option(s) {sorted(options)}; it takes rho0, fast, max_iter, "
            "pcg_iters, damp, update_every, pcg_tol, pcg_loss_tol and per_row."
        )
    check_inputs(weight, stats, spec, name)
    d_iter, d_pcg, d_tol, switch_iter, stop_change = _DEFAULTS[bool(fast)]
    max_iter = d_iter if max_iter is None else max_iter
    pcg_iters = d_pcg if pcg_iters is None else pcg_iters
    pcg_tol = d_tol if pcg_tol is None else pcg_tol
    check_number(name, "rho0", rho0, positive=True)
    check_number(name, "pcg_tol", pcg_tol, positive=True)
    check_number(name, "pcg_loss_tol", pcg_loss_tol)
    check_number(name, "damp", damp)
    check_int(name, "max_iter", max_iter, 1)
    check_int(name, "pcg_iters", pcg_iters, 0)
    check_int(name, "update_every", update_every, 1)

    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    prep = _Prepared.of(stats, weight.shape[1], damp, compute, name, weight.device)
    with torch.no_grad():
        b0 = (weight.detach().to(torch.float64) * prep.scale).to(compute)  # B = W·diag(d)
        b_admm, admm_info = _admm(
            b0, prep, spec, per_row,
            rho0, max_iter, update_every, switch_iter, stop_change,
        )
        mask = _project_mask(b_admm.abs(), spec, per_row)
        if pcg_iters > 0:
            b, pcg_info = _pcg(prep.hn, b0, mask, b_admm, pcg_tol, pcg_iters, pcg_loss_tol)
        else:
            b, pcg_info = b_admm * mask, {"iterations": 0, "residual": float("nan"), "loss_change": 0.0}
        pruned = (b.to(torch.float64) / prep.scale).masked_fill(~mask, 0).to(weight.dtype)

    res = solve_result(
        weight, pruned, mask, stats.xtx,
        **admm_info, pcg_iterations=pcg_info["iterations"], pcg_residual=pcg_info["residual"],
        pcg_loss_change=pcg_info["loss_change"], damp=prep.damp,
    )
    log.debug("%s: ALPS %s", name, res.info)
    return res


def pcg_refit(
    weight: Tensor,
    mask: Tensor,
    h: Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    init: Tensor | None = None,
    loss_tol: float = 0.0,
) -> tuple[Tensor, dict[str, Any]]:
    """Least-squares refit of ``weight`` on a fixed support by batched PCG.

    For every row ``r`` solves ``min_x (x − w_r) H (x − w_r)ᵀ`` over ``x`` supported on
    ``mask[r]``, i.e. the normal equations ``H_SS x_S = (H w_r)_S``, with conjugate
    gradients preconditioned by ``diag(H)`` (Jacobi), all rows at once. No inverse.

    Args:
        weight: reference weight ``[out, in]``.
        mask: boolean keep-mask ``[out, in]``.
        h: symmetric positive (semi-)definite ``[in, in]``; positive definite on every
            row's support for a unique answer.
        tol: stop when every row's residual norm is at most ``tol`` times its
            right-hand side's.
        max_iter: iteration cap.
        init: starting point (default ``weight * mask``).
        loss_tol: also stop once two consecutive iterations have each lowered the loss
            ``Σ_r (x_r − w_r) H (x_r − w_r)ᵀ`` by at most this fraction of it (0 = off).

    Returns:
        The refitted weight (dtype of ``weight``, zero off the mask) and ``info`` with
        ``iterations``, ``residual`` (max relative residual reached) and ``loss_change``
        (the fraction of the starting loss removed).
    """
    if weight.dim() != 2 or mask.shape != weight.shape or mask.dtype != torch.bool:
        raise SolverError(
            f"pcg_refit needs a 2-D weight and a boolean mask of the same shape, got {tuple(weight.shape)} "
            f"and {tuple(mask.shape)} ({mask.dtype})."
        )
    if h.shape != (weight.shape[1], weight.shape[1]):
        raise SolverError(f"pcg_refit: H has shape {tuple(h.shape)}, expected ({weight.shape[1]}, {weight.shape[1]}).")
    check_number("pcg_refit", "tol", tol, positive=True)
    check_int("pcg_refit", "max_iter", max_iter, 0)
    check_number("pcg_refit", "loss_tol", loss_tol)
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    start = (weight if init is None else init).to(dtype)
    x, info = _pcg(h.to(dtype), weight.to(dtype), mask, start, tol, max_iter, loss_tol)
    return x.to(weight.dtype), info


# ---------------------------------------------------------------------------- internals


@dataclass
class _Prepared:
    """What ALPS derives from one Linear's statistics before solving: the damped
    unit-diagonal Hessian ``Ĥ`` (in the compute dtype), the column scale ``d`` (float64),
    the absolute damping, and, on first use, the eigendecomposition of ``Ĥ``."""

    hn: Tensor
    scale: Tensor
    damp: float
    _eig: tuple[Tensor, Tensor] | None = None

    def eig(self) -> tuple[Tensor, Tensor]:
        """``(Λ clamped at 0, Q)`` of ``Ĥ``, computed once."""
        if self._eig is None:
            evals, evecs = torch.linalg.eigh(self.hn)
            self._eig = (evals.clamp_min(0), evecs)
        return self._eig

    @staticmethod
    def of(stats: LayerStats, cols: int, damp: float, compute: torch.dtype, name: str, device: torch.device) -> "_Prepared":
        """The preparation of ``stats``, reused when the previous call prepared the same
        statistics object (unchanged ``XᵀX``) with the same settings."""
        global _LAST
        key = None
        if stats.xtx is not None:
            key = (cols, damp, compute, device, stats.count, id(stats.xtx), stats.xtx._version)
            if _LAST is not None and _LAST[0]() is stats and _LAST[1] == key:
                return _LAST[2]
        h = layer_hessian(stats, cols, name, device)
        if float(h.diagonal().mean()) <= 0:
            raise SolverError(
                f"{name}: every input of this layer was zero during calibration, so XᵀX carries no information "
                "to prune by; use magnitude pruning for it or check the calibration data."
            )
        if damp == 0 and bool((h.diagonal() == 0).any()):
            raise SolverError(f"{name}: some inputs are always zero and damp=0 leaves H singular; use damp > 0.")
        hn, scale, damp_abs = unit_diagonal(h, damp)
        prep = _Prepared(hn.to(compute), scale, damp_abs)
        del h, hn
        _LAST = (weakref.ref(stats, _forget), key, prep)
        return prep


# The last preparation: (weak reference to its statistics, key, preparation); dropped as
# soon as those statistics are garbage, so it never keeps a finished stage's matrices.
_LAST: tuple[weakref.ref[LayerStats], tuple[Any, ...] | None, _Prepared] | None = None


def _forget(ref: weakref.ref[LayerStats]) -> None:
    global _LAST
    if _LAST is not None and _LAST[0] is ref:
        _LAST = None


def _admm(
    b0: Tensor,
    prep: _Prepared,
    spec: SparsitySpec,
    per_row: bool,
    rho: float,
    max_iter: int,
    update_every: int,
    switch_iter: int,
    stop_change: float,
) -> tuple[Tensor, dict[str, Any]]:
    """ADMM with the support-driven ρ schedule; returns the last ``B`` and diagnostics."""
    project = _Projector(spec, per_row, b0)
    update = _CholeskyUpdate(b0, prep) if 4 * b0.shape[0] >= b0.shape[1] else _EigenUpdate(b0, *prep.eig())
    mask_init = project(b0.abs())
    d_init = b0 * mask_init
    d, v, b = d_init.clone(), torch.zeros_like(b0), b0.clone()
    prev = mask_init
    kept = max(int(prev.sum()), 1)
    started, backoffs, change, it = False, 0, float("nan"), 0
    for it in range(1, max_iter + 1):
        b = update(d.mul_(rho).sub_(v), rho)  # (B₀Ĥ + ρD − V)(Ĥ + ρI)⁻¹; d is rebuilt below
        d = torch.add(b, v, alpha=1.0 / rho)  # the point to project: B + V/ρ
        support = project(d.abs())
        d.mul_(support)
        v.add_(b - d, alpha=rho)
        if it % update_every:
            continue
        flips = int((support ^ prev).sum())
        prev = support
        change = flips / kept
        stop = False
        if change > 0.1:
            rho, started = rho * 1.3, True
        elif change > 0.005:
            rho, started = rho * 1.2, True
        elif started:
            if flips:
                rho *= 1.1
            else:
                stop = True
        elif backoffs < _MAX_BACKOFFS:
            # ρ is so large that the support cannot leave the initial one: restart smaller.
            backoffs += 1
            rho /= 5
            if flips:
                d, v, b = d_init.clone(), torch.zeros_like(b0), b0.clone()
                prev = mask_init
        else:
            started = True  # the initial support is stationary; accept it
            stop = not flips
        rho = min(rho, _RHO_MAX)
        if stop or (it >= switch_iter and started and change < stop_change):
            break
    return b, {"iterations": it, "rho": rho, "support_change": change, "backoffs": backoffs}


class _EigenUpdate:
    """``B = (B₀Ĥ + U)(Ĥ + ρI)⁻¹`` through ``Ĥ = QΛQᵀ``: ``[(B₀Q)Λ + UQ] / (Λ + ρ) · Qᵀ``."""

    def __init__(self, b0: Tensor, evals: Tensor, q: Tensor) -> None:
        self.evals, self.q = evals, q
        self.b0q_l = (b0 @ q) * evals  # (B₀Ĥ)Q = (B₀Q)Λ, fixed

    def __call__(self, u: Tensor, rho: float) -> Tensor:
        return torch.addmm(self.b0q_l, u, self.q).div_(self.evals + rho) @ self.q.T


class _CholeskyUpdate:
    """``B = (B₀Ĥ + U)(Ĥ + ρI)⁻¹`` by two triangular solves with ``L Lᵀ = Ĥ + ρI``,
    factored again whenever ρ changes. Should a factorisation fail (``damp=0`` on nearly
    collinear inputs, with ρ backed off to a few 1e-4), the rest of the run takes the
    eigenbasis route, which clamps the spectrum at 0."""

    def __init__(self, b0: Tensor, prep: _Prepared) -> None:
        self.prep, self.b0 = prep, b0
        self.b0h = b0 @ prep.hn
        self.rho: float | None = None
        self.factors: tuple[Tensor, Tensor] | None = None  # (L, Lᵀ) of Ĥ + ρ I for self.rho
        self.fallback: _EigenUpdate | None = None

    def __call__(self, u: Tensor, rho: float) -> Tensor:
        if self.fallback is not None:
            return self.fallback(u, rho)
        if rho != self.rho or self.factors is None:
            a = self.prep.hn.clone()
            a.diagonal().add_(rho)
            lower, info = torch.linalg.cholesky_ex(a)
            if int(info) != 0:
                self.fallback = _EigenUpdate(self.b0, *self.prep.eig())
                return self.fallback(u, rho)
            self.factors, self.rho = (lower, lower.T.contiguous()), rho
        lower, upper = self.factors
        y = torch.linalg.solve_triangular(upper, u.add_(self.b0h), upper=True, left=False)  # Y Lᵀ = R
        return torch.linalg.solve_triangular(lower, y, upper=False, left=False)  # B L = Y


class _Projector:
    """Support of the Euclidean projection onto the pattern: the largest ``score = |x|``.

    N:M keeps the ``N`` largest of every group of ``M`` (ties: the first in the group),
    ranked by pairwise comparison for ``M <= 8``; ``per_row`` the largest of each row; a
    layer budget the ``keep`` largest overall (:func:`_global_top`, with a fixed random
    sample of positions that brackets the threshold so only a thin window is selected
    from exactly).
    """

    def __init__(self, spec: SparsitySpec, per_row: bool, like: Tensor, sample: int = 16384) -> None:
        self.spec, self.per_row = spec, per_row
        self.keep = like.numel() - int(spec.sparsity * like.numel())
        self.sample: Tensor | None = None
        if not (spec.is_nm or per_row) and like.numel() > 8 * sample:
            g = torch.Generator(device="cpu").manual_seed(0)
            self.sample = torch.randint(like.numel(), (sample,), generator=g).to(like.device)

    def __call__(self, score: Tensor) -> Tensor:
        spec = self.spec
        if spec.is_nm:
            assert spec.n is not None and spec.m is not None
            if spec.m <= 8:
                return _nm_top(score, spec.n, spec.m)
            return spec.keep_mask(score)
        if self.per_row:
            return spec.keep_mask(score, per_row=True)
        return _global_top(score, self.keep, self.sample)


def _project_mask(score: Tensor, spec: SparsitySpec, per_row: bool) -> Tensor:
    """The final support: :class:`_Projector` without a sample (exact selection)."""
    return _Projector(spec, per_row, score, sample=score.numel())(score)


def _nm_top(score: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive entries of each row; of equal
    scores the earlier one ranks higher. ``O(m²)`` comparisons, no sort."""
    rows, cols = score.shape
    g = score.reshape(rows, cols // m, m)
    cols_m = g.unbind(-1)
    ranks = []
    for i in range(m):
        rank = torch.zeros(g.shape[:-1], dtype=torch.uint8, device=score.device)
        for j in range(m):
            if j < i:
                rank += cols_m[j] >= cols_m[i]
            elif j > i:
                rank += cols_m[j] > cols_m[i]
        ranks.append(rank)
    return (torch.stack(ranks, -1) < n).reshape(rows, cols)


def _global_top(score: Tensor, keep: int, sample: Tensor | None) -> Tensor:
    """Mask of the ``keep`` largest entries of ``score`` (ties: lowest flat index first),
    the rule of ``SparsitySpec.keep_mask(per_row=False)`` up to ties.

    With ``sample`` (flat positions drawn once), the threshold is first bracketed by two
    quantiles of the sampled scores, four standard errors apart around the target rank;
    the exact threshold is then the right order statistic of the entries inside the
    bracket, a few per cent of them. A bracket that misses falls back to a selection
    over all entries, so the answer never depends on the sample.
    """
    flat = score.reshape(-1)
    n = flat.numel()
    if keep >= n:
        return torch.ones_like(score, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thr: Tensor | None = None
    if sample is not None:
        picked = flat[sample].sort().values
        s = picked.numel()
        frac = keep / n  # fraction of entries kept, i.e. at or above the threshold
        margin = 4.0 * math.sqrt(frac * (1.0 - frac) / s) + 2.0 / s
        lo = picked[max(int(s * (1.0 - frac - margin)), 0)]
        hi = picked[min(int(s * (1.0 - frac + margin)), s - 1)]
        above = int((flat > hi).sum())
        window = flat[(flat >= lo) & (flat <= hi)]
        need = keep - above
        if 0 < need <= window.numel():
            thr = torch.kthvalue(window, window.numel() - need + 1).values
    if thr is None:
        thr = torch.kthvalue(flat, n - keep + 1).values
    mask = flat >= thr
    extra = int(mask.sum()) - keep
    if extra > 0:  # ties at the threshold: the latest ones go
        ties = torch.nonzero(flat == thr).flatten()
        mask[ties[ties.numel() - extra:]] = False
    return mask.view_as(score)


def _pcg(
    h: Tensor, w: Tensor, mask: Tensor, init: Tensor, tol: float, max_iter: int, loss_tol: float
) -> tuple[Tensor, dict[str, Any]]:
    """Batched Jacobi-PCG for ``(H x)_S = (H w)_S`` per row, in the dtype of ``h``.

    Stops when every row's residual is at most ``tol`` times its right-hand side, or
    (``loss_tol > 0``) when two consecutive iterations have each lowered the loss
    ``Σ_r (x_r − w_r) H (x_r − w_r)ᵀ`` by at most ``loss_tol`` times its current value.
    An iteration with step ``α`` lowers that loss by exactly ``α · rᵀz`` per row, so the
    watch costs no extra product.
    """
    dtype = h.dtype
    m = mask.to(dtype)
    wh = w.to(dtype) @ h
    rhs = wh * m
    x = init.to(dtype) * m
    xh = x @ h
    f64 = torch.float64
    # (x − w)H(x − w)ᵀ summed over rows, from the two products at hand (float64 sums)
    loss = float((x * xh).sum(dtype=f64) - 2 * (x * wh).sum(dtype=f64) + (w * wh).sum(dtype=f64))
    loss0 = loss
    r = rhs - xh * m
    del wh, xh
    diag = h.diagonal()
    pinv = torch.where(diag > 0, 1.0 / diag, torch.ones_like(diag))
    z = r * pinv
    p = z.clone()
    rz = (r * z).sum(1)
    rhs_norm = rhs.norm(dim=1)
    limit = tol * rhs_norm
    res = r.norm(dim=1)
    it, small = 0, 0
    for it in range(1, max_iter + 1):
        if bool((res <= limit).all()):
            it -= 1
            break
        active = res > limit  # converged rows stop moving (and avoid 0/0)
        ap = (p @ h) * m
        pap = (p * ap).sum(1)
        alpha = torch.where(active & (pap > 0), rz / torch.where(pap > 0, pap, torch.ones_like(pap)), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        drop = float((alpha * rz).sum(dtype=f64))  # the loss this step removed
        loss -= drop
        z = r * pinv
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
        p = torch.where(active[:, None], z + beta[:, None] * p, torch.zeros_like(p))
        rz = rz_new
        res = r.norm(dim=1)
        small = small + 1 if drop <= loss_tol * max(loss, 0.0) else 0
        if loss_tol > 0 and small >= 2:
            break
    rel = res / torch.where(rhs_norm > 0, rhs_norm, torch.ones_like(rhs_norm))
    return x * m, {
        "iterations": it,
        "residual": float(rel.max()) if rel.numel() else 0.0,
        "loss_change": (loss0 - loss) / loss0 if loss0 > 0 else 0.0,
    }
