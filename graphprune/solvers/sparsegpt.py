"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately
Pruned in One-Shot").

Goal: for a Linear ``W [out, in]`` with inputs ``X``, find a sparse ``Ŵ`` that keeps
``‖WX − ŴX‖²`` small. With ``H = XᵀX / n`` that error is ``Σ_r δ_r H δ_rᵀ`` for
row differences ``δ_r``, so every row is an independent quadratic problem sharing
one Hessian.

The method sweeps the input columns left to right. When column ``j`` is reached,
the weights of that column that the mask drops are set to zero and the error this
causes is compensated by the optimal (OBS) update of the columns *after* ``j``,
which are still free. With ``U`` the upper Cholesky factor of ``H⁻¹``
(``H⁻¹ = UᵀU``), row ``j`` of ``U`` is exactly the OBS update direction for the
problem restricted to columns ``j..in-1`` and ``U_jj² = [(H_{j:,j:})⁻¹]_00``, so one
factorisation serves every step of the sweep:

    err_r = (w_rj − ŵ_rj) / U_jj           (zero for kept weights)
    W[:, j:] −= err ⊗ U[j, j:]

Updates are applied eagerly inside a block of ``blocksize`` columns and lazily to
the columns after the block (one matrix product per block), which is the same
arithmetic reordered so that most of it is a GEMM.

Mask selection is adaptive: for unstructured sparsity each block, before its sweep,
drops the ``int(sparsity · rows · block_cols)`` weights with the smallest OBS
saliency ``w²/U_jj²`` over the whole block (so the layer's sparsity is exact but
rows may differ); for ``N:M`` each group of ``M`` columns is chosen when the sweep
reaches it, from the already-updated weights.

Numerics: ``H`` is damped, inverted and factored in float64 (cheap, ``in × in``);
the sweep runs in float32 (float64 when the weight is float64), which is accurate
to float32 rounding and several times faster on CPU.

Two consequences of the method worth knowing (tested in tests/solvers/test_sparsegpt.py):

* compensation only ever moves weights to the right of a pruned one, so even a single
  pruned weight is not the unrestricted least-squares optimum unless it sits in the
  first column (then the step is exactly OBS); in general the result is the optimum of
  that restricted problem;
* the unstructured mask of a block is chosen from the weights as they are when the
  block starts. When one block spans the whole input width and ``H`` is badly
  conditioned, the sweep's compensation changes later weights a lot and that mask can
  be no better than Wanda's; with LLM widths (many blocks) SparseGPT is clearly better.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers.base import LayerStats, SolveResult, check_inputs, check_int, check_number, solve_result
from graphprune.solvers.spec import SparsitySpec

log = logging.getLogger(__name__)

# After the requested damping fails, retry this many times, 10x more each time.
_DAMP_RETRIES = 3


def sparsegpt_prune(
    weight: Tensor,
    stats: LayerStats,
    spec: SparsitySpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    *,
    name: str = "weight",
    **options: Any,
) -> SolveResult:
    """Prune ``weight [out, in]`` with SparseGPT.

    Args:
        weight: the Linear's weight ``[out, in]``; not modified.
        stats: calibration statistics; ``stats.xtx [in, in]`` is required.
        spec: sparsity target and pattern.
        blocksize: columns per lazy-update block. For ``N:M`` it is rounded down to a
            multiple of ``M`` (at least ``M``) so groups never straddle blocks.
        percdamp: damping added to the Hessian diagonal, as a fraction of its mean.
            If the damped Hessian is still not positive definite, the damping is
            raised 10x at a time (``_DAMP_RETRIES`` times) before giving up.
        name: how errors refer to this weight (e.g. the module path).
        **options: none other are accepted; an unknown option is a :class:`ConfigError`.

    Returns:
        ``SolveResult`` with the pruned weight (dtype and device of ``weight``, exactly
        zero where the mask is False), the boolean keep-mask, and ``info``: ``damp``
        (absolute damping used), ``percdamp`` (as a fraction of mean diag H),
        ``damp_retries``, ``dead_columns`` (inputs that were always zero; their
        weights are zeroed), ``blocksize``, ``sparsity`` (achieved), ``error``
        (``‖WX − ŴX‖²`` with the undamped ``XᵀX``) and ``rel_error`` (over ``‖WX‖²``).

    Raises:
        ConfigError: bad ``blocksize`` / ``percdamp`` / unknown option / pattern.
        SolverError: missing or malformed ``XᵀX``, or a Hessian that stays
            indefinite after all damping retries.
    """
    if options:
        raise ConfigError(
            f"{name}: sparsegpt_prune got unknown option(s) {sorted(options)}; it takes blocksize and percdamp."
        )
    check_inputs(weight, stats, spec, name)
    check_int(name, "blocksize", blocksize, 1, hint="128 is typical")
    check_number(name, "percdamp", percdamp, hint="0.01 is typical")
    rows, cols = weight.shape
    if spec.is_nm:
        assert spec.m is not None
        blocksize = max(spec.m, blocksize - blocksize % spec.m)

    h = stats.hessian(torch.float64).to(weight.device)
    if h.shape != (cols, cols):
        raise SolverError(
            f"{name}: the input Hessian XᵀX has shape {tuple(h.shape)}, expected ({cols}, {cols}); "
            "the statistics belong to a different layer."
        )
    diag = h.diagonal()
    if (diag < 0).any():
        raise SolverError(
            f"{name}: the input Hessian XᵀX has negative diagonal entries, so it is not a Gram matrix; "
            "the calibration statistics are corrupt, recollect them."
        )

    with torch.no_grad():
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # Work on the transpose: a column of W becomes a contiguous row, so the
        # per-column updates and the per-block lazy updates touch contiguous memory.
        # Always a fresh buffer: `.to()`/`.contiguous()` may return the input itself
        # (e.g. a float32 [1, in] weight), and the sweep writes in place.
        wt = torch.empty((cols, rows), dtype=compute, device=weight.device).copy_(weight.detach().t())
        # An input that is always zero has no curvature; give it a unit diagonal so H
        # stays invertible. Its weights never affect the output, so zero them.
        dead = diag == 0
        n_dead = int(dead.sum())
        if n_dead:
            h = h.clone()  # never write into anything that might alias stats.xtx
            h.diagonal()[dead] = 1.0
            wt[dead] = 0
        u, damp, frac, retries = _inverse_hessian_factor(h, percdamp, name)
        del h, diag  # the sweep reads the factor only; each in x in buffer held is one more at the solve's peak
        u = u.to(compute)
        keep_t = _sweep(wt, u, spec, blocksize)
        del u
        mask = keep_t.t().contiguous()
        pruned = wt.t().to(weight.dtype).contiguous()

    return solve_result(
        weight, pruned, mask, stats.xtx, damp=damp, percdamp=frac, damp_retries=retries, dead_columns=n_dead, blocksize=blocksize
    )


def _inverse_hessian_factor(h: Tensor, percdamp: float, name: str) -> tuple[Tensor, float, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``(H + λI)⁻¹ = UᵀU``), float64.

    ``λ = percdamp · mean(diag H)``; on failure ``percdamp`` grows 10x per retry.
    ``h`` is not modified. Returns ``(U, λ, percdamp used, retries)``.
    """
    mean_diag = float(h.diagonal().mean())
    # percdamp = 0 asks for no damping; if that fails, start retrying from 1e-3.
    fracs = [percdamp] + [max(percdamp, 1e-3) * 10.0**k for k in range(1, _DAMP_RETRIES + 1)]
    for retry, frac in enumerate(fracs):
        damp = frac * mean_diag
        # With J the reversal permutation and J(H + λI)J = L̃L̃ᵀ, the factor is
        # U = J L̃⁻¹ J: one Cholesky and one triangular solve, ~1.5x faster on CPU
        # than inverting H (cholesky_inverse) and factoring the inverse again.
        # At most four in x in buffers live at once (h and three more; each is 18 MiB of
        # float64 on a 1536-wide input, and the solve is a stage's memory peak). Solving in
        # place into the identity would save one more, but LAPACK's in-place path rounds
        # differently (1e-17), which moves N:M choices and so the committed figures.
        hd = h.flip(0, 1)
        hd.diagonal().add_(damp)
        low, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            inv = torch.linalg.solve_triangular(low, eye, upper=False)  # L̃⁻¹
            del low, eye
            u = inv.flip(0, 1)
            del inv
            if bool(torch.isfinite(u).all()):
                if retry:
                    log.warning("%s: Hessian needed damping %g x mean(diag H) (asked for %g).", name, frac, percdamp)
                return u, damp, frac, retry
    raise SolverError(
        f"{name}: the input Hessian XᵀX is not positive definite even after damping with up to "
        f"{fracs[-1]:g} x mean(diag H) = {fracs[-1] * mean_diag:g}; XᵀX of real activations is positive "
        "semi-definite, so the calibration statistics are probably corrupt (accumulate them in float64) "
        "or too few tokens were seen."
    )


def _sweep(wt: Tensor, u: Tensor, spec: SparsitySpec, blocksize: int) -> Tensor:
    """Prune ``wt`` (= Wᵀ, ``[in, out]``) in place; return the keep-mask, also ``[in, out]``.

    ``u`` is the upper Cholesky factor of the damped ``H⁻¹`` in ``wt``'s dtype.
    """
    cols, rows = wt.shape
    keep = torch.ones(cols, rows, dtype=torch.bool, device=wt.device)
    d_all = u.diagonal()
    m = spec.m or 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = wt[i1:i2]  # a view: updated in place
        u1 = u[i1:i2, i1:i2]
        d = d_all[i1:i2].unsqueeze(1)
        keep1 = keep[i1:i2]
        if not spec.is_nm:
            keep1.copy_(spec.keep_mask((w1 / d).square(), per_row=False))
        # scale[j, r] = 1/U_jj where w_rj is dropped, 0 where kept: err = w * scale.
        scale = (~keep1).to(wt.dtype) / d
        err = torch.empty_like(w1)
        for j in range(i2 - i1):
            if m and j % m == 0:
                # N:M: choose this group now, from weights already updated by the sweep.
                group = (w1[j : j + m] / d[j : j + m]).square().t()
                keep1[j : j + m] = spec.keep_mask(group).t()
                scale[j : j + m] = (~keep1[j : j + m]).to(wt.dtype) / d[j : j + m]
            torch.mul(w1[j], scale[j], out=err[j])
            w1[j:].addr_(u1[j, j:], err[j], alpha=-1)
        # A dropped weight's own update leaves it at zero up to rounding; make it exact.
        w1.masked_fill_(~keep1, 0)
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)
    return keep
