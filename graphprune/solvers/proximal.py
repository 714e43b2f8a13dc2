"""Proximal 2:4 pruning (Kübler, Wang, Sabach, Ansari, Kleindessner, Budhathoki, Cevher,
Karypis 2025, "A Proximal Operator for Inducing 2:4-Sparsity") and masked gradient
refinement.

**Regulariser.** For a group ``w ∈ R⁴`` of four consecutive inputs of a row,

    r(w) = Σ_{i<j<k} |w_i w_j w_k|          (sum of the four triple products)

which is zero exactly when the group has at most two non-zeros, i.e. is 2:4 sparse, and
grows smoothly otherwise (the regulariser as restated by the same group in ProxSparse,
Liu et al. 2025). The prox below is derived from it and verified against brute force in
tests/solvers/test_proximal.py.
It only covers 2:4: any other pattern is a :class:`ConfigError`, not a silent fallback.

**Proximal operator** ``prox(z) = argmin_u ½‖u − z‖² + λ r(u)``, per group
(:func:`prox_nm_group`), vectorised over all groups. With ``y = |z|`` sorted decreasingly
the minimiser keeps the signs of ``z`` and the order of ``y`` and lies in the box
``[0, y]``. Then:

* the 2-sparse point ``(y1, y2, 0, 0)`` (r = 0, cost ``½(y3² + y4²)``) is the answer
  unless a point with a third non-zero can beat it, which needs ``y3 > λ(y1 − ρ)(y2 − ρ)``
  with ``ρ = ‖(y3, y4)‖`` (a cheap screen that settles most groups once λ is large);
* if ``2λ(y1 + y2 + y3) < 1`` the objective is strictly convex on the box (Hessian
  ``I + λM``, ``M >= 0`` with row sums ``<= 2(y1 + y2 + y3)``): exact coordinate descent
  (a contraction there) converges to the unique minimiser, whatever its support;
* otherwise the best of all stationary points is taken. Three non-zeros ``(a, b, c, 0)``:
  for fixed ``c`` (``λc < 1`` at any stationary point) ``(a, b)`` solves a 2×2 system, and
  stationarity in ``c`` is, with ``x = λc``, the monic quintic
  ``(x − λy3)(1 − x²)² + λ²(y1 − x y2)(y2 − x y1) = 0`` on ``(0, min(λy3, y2/y1)]``; the
  Budan–Fourier bound counts its roots there, a single root is found by safeguarded
  Newton and intervals that may hold several use the companion matrix's eigenvalues.
  Four non-zeros: the system reduces to one equation in ``p = u1 + u2``
  (:func:`_four_nonzero`), whose sign changes are found on a 72-point grid and refined.
  Two roots closer than a grid cell could be missed; none were in 100 000 random groups
  (near-ties included) compared with multi-start brute force.

**Solver** (:func:`proximal_nm_prune`). ``H = XᵀX / n`` is damped by 1 % of its mean
diagonal (as SparseGPT and ALPS do) and, by default, the problem is diagonally
preconditioned: with ``d = sqrt(diag H)`` the variables are ``B = W · diag(d)`` and the
Hessian ``diag(d)⁻¹ H diag(d)⁻¹`` has unit diagonal. The layer-wise loss and the set of
exactly-2:4 weights are unchanged (scaling columns moves no zero), but two things improve.
Gradient steps of size ``1/L`` are no longer dominated by the few outlier input channels
that set ``λ_max(H)`` in language models; and the regulariser, applied to ``B``, weighs each
weight by its input's norm (``|B_ij| = |W_ij| · ‖X_j‖``, the Wanda score), so it removes what
matters least to the output rather than what is smallest. On the real layers of the default
model measured it lowered the 2:4 reconstruction error by 7-36 %
(``benchmarks/results/prune_quality.notes.md``); ``precondition=False`` runs on ``W`` itself. Then: proximal gradient on
``f(B) = tr((B − B₀) H (B − B₀)ᵀ)`` with step ``1/L``,
``L = 2 λ_max(H)``, and a regularisation weight that grows exponentially,
``λ_t = lam0 · growth^t / (η σ_r)`` for row ``r`` (``σ_r`` its RMS weight, ``η`` the
step), so that ``lam0 · growth^t`` is the scale-free strength of the prox. It stops as
soon as every group is exactly 2:4; after ``steps`` steps, groups that are not yet exact
keep their two largest weights. The mask then holds every non-zero (topped up to exactly
two per group by ``|W₀|`` where the prox removed more) and the weights are fitted on it:
by default exactly, with the batched conjugate gradients ALPS uses
(:func:`graphprune.solvers.alps.pcg_refit`: the least-squares optimum on the mask, the
point masked gradient descent converges to, reached in 10-20 iterations instead of
approached in 50); ``refine="gd"`` keeps masked steepest descent
(:func:`graphprune.solvers.refine.masked_descent`).

**Cost.** The gradient steps and the refit run in float32 for a float32 weight (the
operator itself always in float64). Each step applies the operator to every group; the
native operator ``graphprune::prox24`` (``graphprune/kernels/csrc/prox24.cpp``, built with
the packed sparse kernel, see :mod:`graphprune.kernels.packed`) computes every case above
in C++ (the convex descent for eight groups at a time, vectorised across them; roots of
the quintic isolated by bisection on the Budan-Fourier count instead of the companion
matrix), reads and writes the float32 steps directly, and flags only convex groups whose
descent has not converged (none in the default model's runs) for the Python code, when
the library is loaded in the process (the prune pass loads it for this solver; solvers do
not import the kernels package). Without it every group takes the Python path, with the
same answer to rounding (tests compare the two).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers.alps import PCG_LOSS_TOL, pcg_refit
from graphprune.solvers.base import LayerStats, SolveResult, check_inputs, check_int, check_number, damp_diagonal, layer_hessian, solve_result, unit_diagonal
from graphprune.solvers.refine import check_lr, lambda_max, masked_descent
from graphprune.solvers.spec import SparsitySpec

F64 = torch.float64
_SWEEPS = 64  # coordinate descent sweeps in the convex case before switching to Newton
_NEWTON_ITERS = 30  # convex case; converged groups leave the active set early
_ROOT_ITERS = 80  # bracketed root refinement (stops early once every bracket has converged)
_BRACKETS = 4  # stationary points with four non-zeros tried per group
# Grid in units of the upper end of p = u1 + u2: uniform, then geometric towards the end.
_GRID = torch.cat([torch.linspace(0, 1, 49, dtype=F64)[:-1], 1 - torch.logspace(-1.5, -12, 24, dtype=F64)])
_GRID = _GRID.sort().values


# ------------------------------------------------------------------------------ regulariser


def nm_regularizer(w: Tensor) -> Tensor:
    """``r(w) = Σ_{i<j<k} |w_i w_j w_k|`` over the last dimension (length 4)."""
    if w.shape[-1] != 4:
        raise ConfigError(f"the 2:4 regulariser works on groups of 4, got a last dimension of {w.shape[-1]}.")
    a, b, c, d = w.abs().unbind(-1)
    return a * b * (c + d) + c * d * (a + b)


def prox_nm_group(z: Tensor, lam: float | Tensor) -> Tensor:
    """Exact proximal operator of ``lam · r`` for every group of 4 in ``z``.

    Args:
        z: ``[..., 4]`` groups (any leading shape), real.
        lam: regularisation weight ``>= 0``; a float or a tensor broadcastable to
            ``z.shape[:-1]`` (one weight per group).

    Returns:
        ``argmin_u ½‖u − z‖² + lam · Σ_{i<j<k}|u_i u_j u_k|`` per group, same shape and
        dtype as ``z``. Ties between equally good minimisers are broken towards the
        sparser one.
    """
    if z.dim() == 0 or z.shape[-1] != 4:
        raise ConfigError(f"prox_nm_group works on groups of 4 (last dimension), got shape {tuple(z.shape)}.")
    if not z.is_floating_point():
        raise ConfigError(f"prox_nm_group needs a floating-point tensor, got {z.dtype}.")
    lam_t = torch.as_tensor(lam, dtype=F64, device=z.device)
    if not bool(torch.isfinite(lam_t).all()) or bool((lam_t < 0).any()):
        raise ConfigError(f"prox_nm_group: lam must be finite and >= 0, got {lam!r}.")
    if not bool(torch.isfinite(z).all()):
        raise SolverError("prox_nm_group: the input contains NaN or Inf.")
    lam_g = torch.broadcast_to(lam_t, z.shape[:-1]).reshape(-1)
    return _prox(z.detach().reshape(-1, 4).to(F64), lam_g).reshape(z.shape).to(z.dtype)


def _prox(flat: Tensor, lam: Tensor) -> Tensor:
    """:func:`prox_nm_group` on checked ``[n, 4]`` groups (float32 or float64, computed in
    float64, returned in their dtype) with ``lam [n]`` float64."""
    flat, lam = flat.contiguous(), lam.contiguous()
    native = _native_prox() if flat.device.type == "cpu" else None
    if native is None:
        return _prox_groups(flat.to(F64), lam).to(flat.dtype)
    out, pending = native(flat, lam)
    rest = torch.nonzero(pending).flatten()
    if rest.numel():
        out[rest] = _prox_groups(flat[rest].to(F64), lam[rest]).to(out.dtype)
    return out


def _prox_groups(flat: Tensor, lam: Tensor) -> Tensor:
    """The operator on ``[n, 4]`` float64 groups, in Python (every case)."""
    y, order = flat.abs().sort(dim=-1, descending=True, stable=True)
    u = _prox_sorted(y, lam)
    return torch.empty_like(u).scatter_(-1, order, u) * flat.sign()


def _native_prox() -> Any:
    """``graphprune::prox24`` when the native library is loaded in this process, else None.

    It settles every group except the rare convex ones whose coordinate descent has not
    converged, which it flags for :func:`_prox_groups`; without it every group takes the
    Python path. Both give the operator to the same tolerances. The prune pass
    loads the library before it runs this solver (``SolverInfo.native_ops``); a direct
    call uses it once :func:`graphprune.kernels.packed.load_native` has run.
    """
    try:
        return torch.ops.graphprune.prox24
    except (AttributeError, RuntimeError):  # the library is not loaded, or predates the operator
        return None


def _objective(u: Tensor, y: Tensor, lam: Tensor) -> Tensor:
    return 0.5 * (u - y).square().sum(-1) + lam * nm_regularizer(u)


def _prox_sorted(y: Tensor, lam: Tensor) -> Tensor:
    """Prox for ``y >= 0`` sorted decreasingly along the last dim; ``[n, 4]`` float64."""
    best = torch.cat([y[:, :2], torch.zeros_like(y[:, 2:])], dim=-1)
    best = torch.where((lam == 0)[:, None], y, best)
    best_f = _objective(best, y, lam)
    # A minimiser u beating the 2-sparse point has ½(u_i − y_i)² < ½(y3² + y4²), so
    # u1 > y1 − ρ and u2 > y2 − ρ; a stationary point with u3 > 0 (u4 > 0) then needs
    # y3 > λ u1 u2 (y4 > λ u1 u2). Groups failing this keep the 2-sparse answer.
    rho = y[:, 2:].square().sum(-1).sqrt()
    floor = lam * (y[:, 0] - rho).clamp_min(0) * (y[:, 1] - rho).clamp_min(0)
    live = (lam > 0) & (y[:, 2] > floor)
    # Where 2λ(y1 + y2 + y3) < 1 the objective is strictly convex on the box [0, y]
    # (its Hessian is I + λM with M >= 0 of row sums <= 2(y1 + y2 + y3)), so descent finds
    # the global minimiser, whatever its support.
    convex = live & (2 * lam * y[:, :3].sum(-1) < 1)
    idx = torch.nonzero(convex).flatten()
    if idx.numel():
        _take_better(best, best_f, idx, _convex_minimiser(y[idx], lam[idx])[:, None, :], y, lam)
    idx = torch.nonzero(live & ~convex).flatten()
    if idx.numel():
        ys, ls = y[idx], lam[idx]
        cands = torch.cat([y[idx, :2], torch.zeros_like(y[idx, 2:])], -1)[:, None, :].repeat(1, _BRACKETS + 1, 1)
        cands[:, 0] = _three_nonzero(ys, ls)
        four = torch.nonzero(y[idx, 3] > floor[idx]).flatten()
        if four.numel():
            cands[four, 1:] = _four_nonzero(ys[four], ls[four])
        _take_better(best, best_f, idx, cands, y, lam)
    return best


def _take_better(best: Tensor, best_f: Tensor, idx: Tensor, cands: Tensor, y: Tensor, lam: Tensor) -> None:
    """Replace ``best[idx]`` by the best of ``cands [k, c, 4]`` where that is strictly better."""
    f = _objective(cands, y[idx, None, :], lam[idx, None])
    fmin, arg = f.min(dim=1)
    pick = cands[torch.arange(idx.numel(), device=cands.device), arg]
    better = fmin < best_f[idx]
    best[idx] = torch.where(better[:, None], pick, best[idx])
    best_f[idx] = torch.where(better, fmin, best_f[idx])


def _three_nonzero(y: Tensor, lam: Tensor) -> Tensor:
    """Best stationary point with support {1, 2, 3} (or the 2-sparse point if none)."""
    y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
    k = lam * y3
    l2 = lam * lam
    # monic quintic in x = λc: coefficients c0..c4 (x⁵ has coefficient 1)
    coef = torch.stack([-k + l2 * y1 * y2, 1 - l2 * (y1 * y1 + y2 * y2), 2 * k + l2 * y1 * y2,
                        torch.full_like(k, -2.0), -k], dim=-1)
    hi = torch.minimum(torch.minimum(k, y2 / y1), torch.ones_like(k))
    roots = torch.zeros_like(k)
    count = _budan_count(coef, torch.zeros_like(k)) - _budan_count(coef, hi)
    one = torch.nonzero(count == 1).flatten()
    if one.numel():
        roots[one] = _bracketed_root(coef[one], hi[one])
    u = _abc(roots, y1, y2, lam)
    many = torch.nonzero(count >= 2).flatten()
    if many.numel():
        # Several roots possible: every real eigenvalue of the companion matrix, polished.
        companion = torch.zeros(many.numel(), 5, 5, dtype=F64, device=y.device)
        companion[:, 0, :] = -coef[many].flip(-1)
        companion[:, 1:, :4] = torch.eye(4, dtype=F64, device=y.device)
        ev = torch.minimum(torch.linalg.eigvals(companion).real.clamp_min(0), hi[many, None])
        ev = _polish(coef[many, None, :].expand(-1, 5, -1), ev, hi[many, None])
        sub = _abc(ev, y1[many, None], y2[many, None], lam[many, None])  # [m, 5, 4]
        f = _objective(sub, y[many, None, :], lam[many, None])
        u[many] = sub[torch.arange(many.numel(), device=y.device), f.argmin(-1)]
    # no root: no stationary point with three non-zeros; the 2-sparse point stands in
    two = torch.cat([y[:, :2], torch.zeros_like(y[:, 2:])], -1)
    return torch.where((count <= 0)[:, None], two, u)


def _abc(x: Tensor, y1: Tensor, y2: Tensor, lam: Tensor) -> Tensor:
    """``(a, b, c, 0)`` for ``c = x/λ`` with ``(a, b)`` optimal given ``c`` (needs ``x < 1``)."""
    one_p = 1 + x
    one_m = (1 - x).clamp_min(torch.finfo(F64).tiny)
    delta = (y1 - y2) / (one_m * one_p)
    delta = torch.where(y1 == y2, torch.zeros_like(delta), delta)
    a = delta + y2 / one_p
    b = -delta + y1 / one_p
    return torch.stack([a, b, x / lam, torch.zeros_like(a)], dim=-1)


def _horner_taylor(coef: Tensor, x: Tensor) -> list[Tensor]:
    """Taylor coefficients ``P⁽ʲ⁾(x)/j!`` (j = 0..5) of the monic quintic with ``coef`` c0..c4.

    Repeated synthetic division: ``P(t) = (t − x)Q(t) + P(x)``, then the same for ``Q``.
    """
    a = [coef[..., i] for i in range(5)] + [torch.ones_like(x)]
    out = []
    for _ in range(6):
        b = [a[-1]]
        for ai in reversed(a[:-1]):
            b.append(ai + x * b[-1])
        out.append(b[-1])
        a = list(reversed(b[:-1]))
    return out


def _budan_count(coef: Tensor, x: Tensor) -> Tensor:
    """Sign variations of ``(P(x), P'(x), …, P⁽⁵⁾(x))`` (zeros skipped)."""
    signs = [torch.sign(t) for t in _horner_taylor(coef, x)]
    count = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    last = signs[5]  # the leading term: always +1
    for j in range(4, -1, -1):
        cur = signs[j]
        flip = (cur != 0) & (cur != last)
        count += flip.long()
        last = torch.where(cur != 0, cur, last)
    return count


def _poly(coef: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Value and derivative of the monic quintic at ``x``."""
    p = torch.ones_like(x)
    dp = torch.zeros_like(x)
    for i in range(4, -1, -1):
        dp = dp * x + p
        p = p * x + coef[..., i]
    return p, dp


def _bracketed_root(coef: Tensor, hi: Tensor) -> Tensor:
    """The single simple root in ``(0, hi]``: Newton steps kept inside a shrinking bracket."""
    lo = torch.zeros_like(hi)
    up = hi.clone()
    p0, dp0 = _poly(coef, lo)
    sign_lo = torch.where(p0 != 0, torch.sign(p0), torch.sign(dp0))  # a root at 0 is not in (0, hi]
    x = 0.5 * (lo + up)
    active = torch.arange(hi.shape[0], device=hi.device)
    for _ in range(_ROOT_ITERS):
        xa, la, ua, ca = x[active], lo[active], up[active], coef[active]
        p, dp = _poly(ca, xa)
        below = torch.sign(p) == sign_lo[active]
        la = torch.where(below, xa, la)
        ua = torch.where(below, ua, xa)
        newton = xa - p / torch.where(dp == 0, torch.ones_like(dp), dp)
        inside = (dp != 0) & (newton > la) & (newton < ua)
        x_new = torch.where(p == 0, xa, torch.where(inside, newton, 0.5 * (la + ua)))
        lo[active], up[active], x[active] = la, ua, x_new
        going = ((x_new - xa).abs() > 4 * torch.finfo(F64).eps * x_new.abs()) & (p != 0)
        active = active[going]
        if active.numel() == 0:
            break
    return torch.where(_poly(coef, hi)[0] == 0, hi, x)


def _polish(coef: Tensor, x: Tensor, hi: Tensor) -> Tensor:
    for _ in range(8):
        p, dp = _poly(coef, x)
        x = torch.where(dp != 0, x - p / torch.where(dp == 0, torch.ones_like(dp), dp), x)
        x = torch.minimum(x.clamp_min(0), hi)
    return x


def _convex_minimiser(y: Tensor, lam: Tensor) -> Tensor:
    """Minimiser over the box ``[0, y]``, where the objective is strictly convex.

    Coordinate descent first (each coordinate minimised exactly: ``u_i = max(y_i − λ
    e2(u without i), 0)``; the gradient map is a contraction with factor
    ``2λ(y1 + y2 + y3) < 1``, and in practice 5–20 sweeps reach 1e-13), then projected
    Newton steps for any group that has not converged after ``_SWEEPS`` sweeps.
    """
    u = y.clone()
    tol = 1e-13 * (1 + y[:, 0])
    active = torch.arange(y.shape[0], device=y.device)
    cols, ya, la, ta = list(y.unbind(-1)), y, lam, tol
    for sweep in range(1, _SWEEPS + 1):
        change = torch.zeros_like(la)
        for i in range(4):
            o = [cols[j] for j in range(4) if j != i]
            new = (ya[:, i] - la * (o[0] * o[1] + o[2] * (o[0] + o[1]))).clamp_min(0)
            change = torch.maximum(change, (new - cols[i]).abs())
            cols[i] = new
        if sweep % 4 and sweep != _SWEEPS:
            continue
        u[active] = torch.stack(cols, -1)
        going = change > ta
        active = active[going]
        if active.numel() == 0:
            return u
        cols, ya, la, ta = [c[going] for c in cols], ya[going], la[going], ta[going]
    f = _objective(u, y, lam)
    eye = torch.eye(4, dtype=F64, device=y.device)
    for _ in range(_NEWTON_ITERS):
        ua, ya, la, fa = u[active], y[active], lam[active], f[active]
        s = ua.sum(-1, keepdim=True)
        e2 = 0.5 * (s.square() - ua.square().sum(-1, keepdim=True))
        grad = ua - ya + la[:, None] * (e2 - ua * (s - ua))
        free = ((ua > 0) | (grad < 0)) & ((ua < ya) | (grad > 0))
        hess = eye + la[:, None, None] * (s[:, :, None] - ua[:, :, None] - ua[:, None, :]) * (1 - eye)
        hess = torch.where(free[:, :, None] & free[:, None, :], hess, eye)
        step = torch.linalg.solve(hess, torch.where(free, grad, torch.zeros_like(grad)).unsqueeze(-1)).squeeze(-1)
        trial = torch.minimum((ua - step).clamp_min(0), ya)
        tf = _objective(trial, ya, la)
        failed = torch.nonzero(tf > fa).flatten()
        t = 0.5
        while failed.numel() and t > 1e-3:  # backtrack only where the full step did not help
            tr = torch.minimum((ua[failed] - t * step[failed]).clamp_min(0), ya[failed])
            tv = _objective(tr, ya[failed], la[failed])
            good = tv <= fa[failed]
            trial[failed[good]], tf[failed[good]] = tr[good], tv[good]
            failed, t = failed[~good], t * 0.5
        stay = torch.zeros_like(tf, dtype=torch.bool)
        stay[failed] = True
        moved = torch.where(stay[:, None], ua, trial)
        u[active], f[active] = moved, torch.where(stay, fa, tf)
        going = ~stay & ((moved - ua).abs().amax(-1) > tol[active])
        active = active[going]
        if active.numel() == 0:
            break
    return u


def _pair_system(p: Tensor, y: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Residual of the reduced stationarity system at ``p = u1 + u2`` (see ``_four_nonzero``).

    Shapes: ``p [m, k]``, ``y [m, 4]``, ``lam [m]``. Returns ``(R, q, δ1, δ2, defined)``.
    """
    y1, y2, y3, y4 = (y[:, i : i + 1] for i in range(4))
    lm = lam[:, None]
    one_p = 1 - lm * p
    d34, d12 = y3 - y4, y1 - y2
    delta2 = torch.where(d34 == 0, torch.zeros_like(p), d34 / one_p.clamp_min(torch.finfo(F64).tiny))
    const = p - 0.5 * lm * delta2.square() - (y1 + y2)  # (λ/2)q² + λp q + const = 0
    q = (torch.sqrt(((lm * p).square() - 2 * lm * const).clamp_min(0)) - lm * p) / lm
    one_q = 1 - lm * q
    delta1 = torch.where(d12 == 0, torch.zeros_like(p), d12 / one_q.clamp_min(torch.finfo(F64).tiny))
    resid = q + lm * p * q + 0.5 * lm * (p.square() - delta1.square()) - (y3 + y4)
    defined = (one_p > 0) & (one_q > 0) & (const < 0)
    return resid, q, delta1, delta2, defined


def _four_nonzero(y: Tensor, lam: Tensor) -> Tensor:
    """Stationary points with four non-zeros, ``[m, _BRACKETS, 4]`` (2-sparse where none).

    With ``p = u1 + u2`` and ``q = u3 + u4``, stationarity of the two pairs gives
    ``u1 − u2 = (y1 − y2)/(1 − λq)``, ``u3 − u4 = (y3 − y4)/(1 − λp)`` and
    ``p + λpq + 2λu3u4 = y1 + y2``, ``q + λpq + 2λu1u2 = y3 + y4``. The third equation is
    a quadratic in ``q`` with exactly one positive root for given ``p``, so the system
    reduces to one equation ``R(p) = 0`` on ``(0, min(y1 + y2, 1/λ))``. Its sign changes
    are located on a grid (uniform, plus geometric towards the upper end where ``R`` is
    steep) and refined by the Illinois method; each root is a candidate.
    """
    top = torch.minimum(y[:, 0] + y[:, 1], 1 / lam)
    p = top[:, None] * _GRID.to(y.device)[None, :]
    resid, _, _, _, defined = _pair_system(p, y, lam)
    change = defined[:, 1:] & defined[:, :-1] & (torch.sign(resid[:, 1:]) * torch.sign(resid[:, :-1]) <= 0)
    # the first _BRACKETS sign changes of every group, as one flat batch
    rank = change.long().cumsum(1)
    group, cell = torch.nonzero(change & (rank <= _BRACKETS), as_tuple=True)
    slot = rank[group, cell] - 1
    out = torch.cat([y[:, :2], torch.zeros_like(y[:, 2:])], -1)[:, None, :].repeat(1, _BRACKETS, 1)
    if group.numel():
        yg, lg = y[group], lam[group]
        root = _illinois(yg, lg, p[group, cell], p[group, cell + 1], resid[group, cell], resid[group, cell + 1])
        _, q, d1, d2, _ = (t[:, 0] for t in _pair_system(root[:, None], yg, lg))
        out[group, slot] = torch.stack([(root + d1) / 2, (root - d1) / 2, (q + d2) / 2, (q - d2) / 2], dim=-1)
    return out


def _illinois(y: Tensor, lam: Tensor, a: Tensor, b: Tensor, fa: Tensor, fb: Tensor) -> Tensor:
    """Root of ``R`` in ``[a, b]`` (``fa·fb <= 0``) by the Illinois variant of regula falsi."""
    a, b, fa, fb = a.clone(), b.clone(), fa.clone(), fb.clone()
    side = torch.zeros_like(a)
    active = torch.arange(a.shape[0], device=a.device)
    for _ in range(_ROOT_ITERS):
        aa, bb, faa, fbb, sd = a[active], b[active], fa[active], fb[active], side[active]
        den = fbb - faa
        safe = torch.where(den != 0, den, torch.ones_like(den))
        c = torch.where(den != 0, (aa * fbb - bb * faa) / safe, 0.5 * (aa + bb))
        c = torch.where((c > torch.minimum(aa, bb)) & (c < torch.maximum(aa, bb)), c, 0.5 * (aa + bb))
        fc = _pair_system(c[:, None], y[active], lam[active])[0][:, 0]
        keep_b = torch.sign(fc) == torch.sign(faa)  # the root lies between c and b
        fa[active] = torch.where(keep_b, fc, torch.where(sd < 0, 0.5 * faa, faa))
        fb[active] = torch.where(keep_b, torch.where(sd > 0, 0.5 * fbb, fbb), fc)
        a[active] = torch.where(keep_b, c, aa)
        b[active] = torch.where(keep_b, bb, c)
        side[active] = torch.where(keep_b, torch.ones_like(sd), -torch.ones_like(sd))
        width = (b[active] - a[active]).abs()
        going = (width > 1e-13 * (a[active].abs() + b[active].abs())) & (fc != 0)
        active = active[going]
        if active.numel() == 0:
            break
    return torch.where(fa.abs() <= fb.abs(), a, b)


# ------------------------------------------------------------------------------ solver


def proximal_nm_prune(
    weight: Tensor,
    stats: LayerStats,
    spec: SparsitySpec,
    lam0: float = 1e-3,
    growth: float = 1.1,
    steps: int = 150,
    refine_steps: int = 50,
    lr: float | None = None,
    precondition: bool = True,
    damp: float = 0.01,
    refine: str = "pcg",
    *,
    name: str = "weight",
    **options: Any,
) -> SolveResult:
    """Prune ``weight [out, in]`` to 2:4 with the proximal 2:4 regulariser, then refine.

    Args:
        weight: the Linear's weight ``[out, in]``; not modified.
        stats: calibration statistics; ``stats.xtx [in, in]`` is required.
        spec: must be ``2:4``.
        lam0: initial scale-free regularisation strength (see the module docstring).
        growth: factor by which the strength grows every step (> 1).
        steps: cap on proximal gradient steps; groups not yet 2:4 after it are projected.
        refine_steps: cap on the refinement's iterations on the final mask (0 = none).
        lr: fixed step for the proximal steps (and for ``refine="gd"``'s), in units of
            ``f = tr(ΔHΔᵀ)``; None uses ``1/(2 λ_max(H))`` for the proximal steps and the
            exact line search for gradient refinement. Must be ``<= 1/λ_max(H)`` (of the
            damped, and with ``precondition`` unit-diagonal, ``H`` the steps run on).
        precondition: run in the variables ``B = W · diag(d)``, ``d = sqrt(diag H)``,
            where the Hessian has unit diagonal (see the module docstring); False runs on
            ``W`` itself.
        damp: ``H`` is damped by ``damp · mean(diag H)`` on the diagonal (0 = none).
        refine: how the weights are fitted on the final mask: ``"pcg"`` (default,
            conjugate gradients on the masked least squares, stopped when two iterations
            in a row each lower the loss by less than 1e-5 of it; see
            :func:`graphprune.solvers.alps.pcg_refit`) or ``"gd"`` (masked steepest
            descent, all ``refine_steps`` steps).
        name: how errors refer to this weight (e.g. the module path).
        **options: none other are accepted; an unknown option is a :class:`ConfigError`.

    Returns:
        ``SolveResult`` with the pruned weight (exactly 2:4, dtype and device of
        ``weight``), the keep-mask (exactly 2 per group) and ``info``: ``steps`` taken,
        ``strength`` (final scale-free λ), ``projected_groups`` (groups the prox had not
        made 2:4), ``refine_steps`` (taken), ``sparsity``, ``error`` and ``rel_error``.
    """
    if options:
        raise ConfigError(
            f"{name}: proximal_nm_prune got unknown option(s) {sorted(options)}; it takes lam0, growth, steps, "
            "refine_steps, lr, precondition, damp and refine."
        )
    check_inputs(weight, stats, spec, name)
    if not (spec.n == 2 and spec.m == 4):
        raise ConfigError(
            f"{name}: the proximal solver implements the 2:4 regulariser of Kübler et al. (2025) only, but "
            f"the pattern is {spec}; use --pattern 2:4, or another method (alps, sparsegpt, wanda) for {spec}."
        )
    check_number(name, "lam0", lam0, positive=True)
    check_number(name, "growth", growth, positive=True)
    if growth <= 1:
        raise ConfigError(f"{name}: growth must be > 1 so that the weights become 2:4, got {growth!r}.")
    check_int(name, "steps", steps, 0)
    check_int(name, "refine_steps", refine_steps, 0)
    if lr is not None:
        check_number(name, "lr", lr, positive=True)
    if not isinstance(precondition, bool):
        raise ConfigError(f"{name}: precondition must be true or false, got {precondition!r}.")
    check_number(name, "damp", damp)
    if refine not in ("pcg", "gd"):
        raise ConfigError(f"{name}: refine must be 'pcg' or 'gd', got {refine!r}.")
    h = layer_hessian(stats, weight.shape[1], name, weight.device)
    if precondition:
        h, scale, _ = unit_diagonal(h, damp)
    else:
        damp_diagonal(h, damp)
        scale = torch.ones(h.shape[0], dtype=h.dtype, device=h.device)
    compute = F64 if weight.dtype == F64 else torch.float32
    h_c = h.to(compute)
    lmax = lambda_max(h_c)
    if lmax <= 0:
        raise SolverError(
            f"{name}: every input of this layer was zero during calibration; there is no loss to guide the "
            "mask. Use magnitude pruning for this layer."
        )
    check_lr(name, lr, lmax)
    eta = lr if lr is not None else 1.0 / (2.0 * lmax)

    with torch.no_grad():
        w0 = (weight.detach().to(F64) * scale[None, :]).to(compute)
        rows, cols = w0.shape
        sigma = w0.square().mean(1).sqrt()
        sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        w = w0.clone()
        strength, taken = lam0, 0
        per_group = (1.0 / sigma).to(F64).repeat_interleave(cols // 4)  # η·λ_t per group is strength / σ_r
        for t in range(steps):
            strength = lam0 * growth**t
            z = torch.add(w, (w - w0) @ h_c, alpha=-2.0 * eta)  # gradient step on f = tr(ΔHΔᵀ)
            w = _prox(z.reshape(-1, 4), per_group * strength).reshape(rows, cols)
            taken = t + 1
            if bool(((w != 0).reshape(rows, -1, 4).sum(-1) <= 2).all()):
                break
        nonzero = (w != 0).reshape(rows, -1, 4).sum(-1)
        projected = int((nonzero > 2).sum())
        # Non-zeros first (largest |W| if a group still has more than two), then |W₀| to top up.
        top = float(w.abs().max()) or 1.0
        ref = float(w0.abs().max()) or 1.0
        score = torch.where(w != 0, 1.0 + w.abs() / top, 0.5 * w0.abs() / ref)
        mask = spec.keep_mask(score)
        pruned = w.masked_fill(~mask, 0)
        refined = 0
        if refine_steps and refine == "pcg":
            pruned, pcg_info = pcg_refit(w0, mask, h_c, max_iter=refine_steps, init=pruned, loss_tol=PCG_LOSS_TOL)
            refined = pcg_info["iterations"]
        elif refine_steps:
            pruned = masked_descent(w0.to(F64), pruned.to(F64), mask, h, refine_steps, lr)
            refined = refine_steps
        pruned = (pruned.to(F64) / scale[None, :]).masked_fill(~mask, 0).to(weight.dtype)

    return solve_result(
        weight, pruned, mask, stats.xtx, steps=taken, strength=strength, projected_groups=projected, refine_steps=refined
    )
