"""Solvers that remove whole input channels of a Linear, for structured pruning.

A structure (an MLP channel: a row of the gate and up projections and a column of the down
projection) disappears from the consumer Linear as a column. With ``X [tokens, d]`` its input
and ``H = XᵀX``, keeping the channel set ``K`` and giving the kept columns new weights ``V``
costs the layer-wise reconstruction error

    E(K, V) = ‖W X − V X_K‖² = tr((W − V̂) H (W − V̂)ᵀ),    V̂ = V on K, 0 elsewhere.

For a fixed ``K`` the best ``V`` is the least-squares solution ``V = W H[:, K] H[K, K]⁻¹``
(:func:`refit_kept`). The solvers differ in how they choose ``K``:

* :func:`structured_obs` (structured Optimal Brain Surgeon, as in ZipLM and SlimGPT):
  remove one column at a time, the one whose removal raises the error least given the
  columns already removed, ``‖W_j‖² / [H⁻¹]_jj`` on the running weight, with the closed-form
  update of the other columns and the inverse Hessian downdated; then the exact refit.
* :func:`swap_refine` (a local search in the spirit of OSSCAR): from a chosen set, exchange a
  kept and a removed column while the exact error goes down.
* :func:`wanda_sp` (Wanda-sp): keep the channels with the largest ``Σ_i |W_ij| · ‖X_j‖``,
  weights unchanged (no reconstruction).
* :func:`flap` (FLAP): keep the channels with the largest fluctuation ``Var(X_j) · ‖W_j‖²``
  and compensate the removed channels' mean contribution in the bias.

Every solver also takes *units*: ``units [n, size]`` lists the columns that go or stay
together (an attention head is ``head_dim`` columns of the output projection; a KV group is
all its query heads' columns), ``keep`` then counts units, and ``parents [n]`` (optional)
says which units share a KV group: each parent keeps the same number of units, so grouped-
query attention keeps one query-head count per KV head. Without ``units`` every column is
its own unit.

All are pure tensor functions; the structured pruning pass chooses the widths and edits
the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers.base import LayerStats, damp_diagonal, reconstruction_error


@dataclass
class ChannelChoice:
    """Which input channels of a Linear stay and the weight they get.

    Attributes:
        keep: sorted indices of the kept input channels ``[k]``.
        weight: the Linear's new weight on them ``[out, k]``.
        bias_delta: added to the Linear's bias (``[out]``, FLAP's compensation), or None.
        info: ``error`` (``E`` above, un-normalised), ``rel_error`` (``E / tr(W H Wᵀ)``) and
            solver details.
    """

    keep: Tensor
    weight: Tensor
    bias_delta: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _check(weight: Tensor, stats: LayerStats, keep: int, name: str) -> None:
    out, d = weight.shape
    if stats.in_features != d:
        raise SolverError(f"{name}: statistics for {stats.in_features} input channels, weight has {d}.")
    if not 1 <= keep <= d:
        raise ConfigError(f"{name}: cannot keep {keep} of {d} input channels; keep between 1 and {d}.")


def _units(d: int, units: Tensor | None) -> Tensor:
    """``[n, size]`` column indices per unit; each column alone when ``units`` is None."""
    if units is None:
        return torch.arange(d).unsqueeze(1)
    units = torch.as_tensor(units, dtype=torch.long)
    if units.dim() != 2 or units.numel() == 0 or int(units.min()) < 0 or int(units.max()) >= d:
        raise SolverError(f"units must be a [n, size] tensor of column indices below {d}, got shape {tuple(units.shape)}.")
    if torch.unique(units).numel() != units.numel():
        raise SolverError("units must not share columns.")
    return units


def _quota(keep: int, n: int, parents: Tensor | None, name: str) -> Tensor | None:
    """Units each parent keeps (``[n_parents]``), or None when the units are free."""
    if parents is None:
        return None
    parents = torch.as_tensor(parents, dtype=torch.long)
    if parents.shape != (n,):
        raise SolverError(f"{name}: parents must give one group per unit ({n}), got shape {tuple(parents.shape)}.")
    counts = torch.bincount(parents)
    groups = int((counts > 0).sum())
    if keep % groups:
        raise ConfigError(f"{name}: cannot keep {keep} units evenly in {groups} groups; keep a multiple of {groups}.")
    return torch.full_like(counts, keep // groups)


def _pick_per_parent(score: Tensor, keep: int, parents: Tensor | None, name: str) -> Tensor:
    """Indices of the units to keep: the ``keep`` best by ``score``, or the best per parent."""
    quota = _quota(keep, score.numel(), parents, name)
    if quota is None:
        return torch.sort(score.argsort(descending=True)[:keep]).values
    parents = torch.as_tensor(parents, dtype=torch.long)
    chosen = []
    for g in torch.unique(parents).tolist():
        idx = (parents == g).nonzero().flatten()
        chosen.append(idx[score[idx].argsort(descending=True)[: int(quota[g])]])
    return torch.sort(torch.cat(chosen)).values


def _columns(units: Tensor, chosen: Tensor) -> Tensor:
    return torch.sort(units[chosen].flatten()).values


def damped_hessian(stats: LayerStats, damp: float) -> Tensor:
    """``XᵀX`` in float64 with ``damp · mean(diag)`` (+1e-12, so dead layers stay invertible) added to the diagonal."""
    if stats.xtx is None:
        raise SolverError("structured reconstruction needs the input Hessian XᵀX, but only column norms were collected.")
    h = stats.xtx.double().clone()
    damp_diagonal(h, damp)
    h.diagonal().add_(1e-12)
    return h


def _spread(weight: Tensor, keep: Tensor, new: Tensor) -> Tensor:
    """``V̂``: ``new`` in the kept columns of a zero matrix shaped like ``weight`` (float64)."""
    full = torch.zeros_like(weight, dtype=torch.float64)
    full[:, keep] = new.double()
    return full


def structured_error(weight: Tensor, keep: Tensor, new: Tensor, xtx: Tensor) -> tuple[float, float]:
    """``(E, E / tr(W H Wᵀ))`` for keeping columns ``keep`` of ``weight`` with weights ``new``."""
    return reconstruction_error(weight, _spread(weight, keep, new), xtx)


def refit_kept(weight: Tensor, h: Tensor, keep: Tensor) -> Tensor:
    """The least-squares weight of the kept columns: ``W H[:, K] H[K, K]⁻¹`` (float64)."""
    w = weight.double()
    hk = h[:, keep]
    rhs = (w @ hk).T  # [k, out]
    chol, info = torch.linalg.cholesky_ex(h[keep][:, keep])
    if int(info) != 0:
        return torch.linalg.solve(h[keep][:, keep], rhs).T
    return torch.cholesky_solve(rhs, chol).T


def structured_obs(
    weight: Tensor,
    stats: LayerStats,
    keep: int,
    *,
    damp: float = 0.01,
    steps: int = 64,
    name: str = "linear",
    units: Tensor | None = None,
    parents: Tensor | None = None,
) -> ChannelChoice:
    """Remove input channels (or units of them) greedily by their exact OBS cost, then refit the kept ones.

    Channels: at most ``steps`` rounds, each removing the ``ceil((d - keep) / steps)`` cheapest
    channels together (one at a time when at most ``steps`` go, as in the tests' small cases).
    Units (``units``/``parents``, see the module doc): one unit per round, the one whose
    removal costs least, ``tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ)`` over its columns ``S``, among the units
    of parents that may still lose one."""
    d = weight.shape[1]
    if units is not None or parents is not None:
        return _obs_units(weight, stats, keep, _units(d, units), parents, damp, name)
    _check(weight, stats, keep, name)
    h = damped_hessian(stats, damp)
    w = weight.double().clone()
    hinv = _inverse(h, name)
    alive = torch.ones(d, dtype=torch.bool)
    todo = d - keep
    # one channel per step up to `steps` steps; beyond that the cheapest `chunk` go together
    # with their joint OBS update (a wide layer would otherwise stream H⁻¹ through memory
    # once per removed channel)
    chunk = max(1, -(-todo // steps))
    while todo > 0:
        diag = torch.diagonal(hinv).clamp_min(1e-30)
        cost = (w * w).sum(0) / diag
        cost[~alive] = float("inf")
        take = min(chunk, todo)
        s = torch.topk(cost, take, largest=False).indices
        _obs_remove(w, hinv, s)
        alive[s] = False
        todo -= take
    kept = alive.nonzero().flatten()
    new = refit_kept(weight, h, kept)
    err, rel = structured_error(weight, kept, new, stats.xtx if stats.xtx is not None else h)
    return ChannelChoice(kept, new.to(weight.dtype), info={"error": err, "rel_error": rel, "method": "obs"})


def _inverse(h: Tensor, name: str) -> Tensor:
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(h))
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise SolverError(f"{name}: the damped input Hessian is not positive definite ({exc}); raise damp.") from exc


def _obs_remove(w: Tensor, hinv: Tensor, s: Tensor) -> None:
    """Remove columns ``s`` jointly: the others absorb their contribution, H⁻¹ is downdated."""
    inv = torch.linalg.inv(hinv[s][:, s])
    rows = inv @ hinv[s, :]  # [|s|, d]
    w -= w[:, s] @ rows
    hinv -= hinv[:, s] @ rows  # H⁻¹ of the remaining columns (rows/columns s become 0)
    w[:, s] = 0.0


def _obs_units(weight: Tensor, stats: LayerStats, keep: int, units: Tensor, parents: Tensor | None, damp: float, name: str) -> ChannelChoice:
    n = units.shape[0]
    if not 1 <= keep <= n:
        raise ConfigError(f"{name}: cannot keep {keep} of {n} units; keep between 1 and {n}.")
    quota = _quota(keep, n, parents, name)
    h = damped_hessian(stats, damp)
    w = weight.double().clone()
    hinv = _inverse(h, name)
    alive = torch.ones(n, dtype=torch.bool)
    left = None if quota is None else torch.bincount(torch.as_tensor(parents, dtype=torch.long)) - quota
    for _ in range(n - keep):
        best, pick = float("inf"), -1
        for u in alive.nonzero().flatten().tolist():
            if left is not None and int(left[int(parents[u])]) <= 0:  # type: ignore[index]
                continue
            s = units[u]
            ws = w[:, s]
            cost = float((ws @ torch.linalg.inv(hinv[s][:, s]) * ws).sum())
            if cost < best:
                best, pick = cost, u
        _obs_remove(w, hinv, units[pick])
        alive[pick] = False
        if left is not None:
            left[int(parents[pick])] -= 1  # type: ignore[index]
    chosen = alive.nonzero().flatten()
    kept = _columns(units, chosen)
    new = refit_kept(weight, h, kept)
    err, rel = structured_error(weight, kept, new, stats.xtx if stats.xtx is not None else h)
    info = {"error": err, "rel_error": rel, "method": "obs", "kept_units": chosen.tolist()}
    return ChannelChoice(kept, new.to(weight.dtype), info=info)


def swap_refine(
    weight: Tensor,
    stats: LayerStats,
    choice: ChannelChoice,
    *,
    swaps: int = 32,
    candidates: int = 8,
    damp: float = 0.01,
    name: str = "linear",
    units: Tensor | None = None,
    parents: Tensor | None = None,
) -> ChannelChoice:
    """Local search on the kept set: exchange a kept and a removed unit while the exact error falls.

    Each round scores every removed channel ``j`` by the error it would take away if added
    (``‖(W − V̂) H_j‖² / s_j``, ``s_j`` the Schur complement of ``H_jj`` given the kept set) and
    every kept channel by its OBS removal cost (a unit: the sums over its columns), tries the
    ``candidates`` best pairs (of the same parent, when ``parents`` is given) by the exact
    refitted error, and keeps the first exchange that lowers it; it stops after ``swaps``
    exchanges or when no tried pair helps. The result is never worse than ``choice``.
    """
    h = damped_hessian(stats, damp)
    d = h.shape[0]
    unit_cols = _units(d, units)
    n = unit_cols.shape[0]
    owner = torch.full((d,), -1, dtype=torch.long)
    owner[unit_cols.flatten()] = torch.arange(n).repeat_interleave(unit_cols.shape[1])
    par = None if parents is None else torch.as_tensor(parents, dtype=torch.long)
    xtx = stats.xtx if stats.xtx is not None else h
    kept_units = torch.zeros(n, dtype=torch.bool)
    kept_units[owner[choice.keep]] = True
    keep = choice.keep.clone()
    new = refit_kept(weight, h, keep).double()
    best, _ = structured_error(weight, keep, new, h)
    done = 0
    w = weight.double()
    for _ in range(swaps):
        if int(kept_units.sum()) in (0, n):
            break
        removed = torch.ones(d, dtype=torch.bool)
        removed[keep] = False
        out_idx = removed.nonzero().flatten()
        resid = (w - _spread(weight, keep, new)) @ h[:, out_idx]  # [out, r]
        hkk_inv = torch.cholesky_inverse(torch.linalg.cholesky(h[keep][:, keep]))
        cross = h[keep][:, out_idx]  # [k, r]
        schur = (torch.diagonal(h)[out_idx] - (cross * (hkk_inv @ cross)).sum(0)).clamp_min(1e-30)
        gain = torch.zeros(n, dtype=torch.float64).index_add_(0, owner[out_idx], (resid * resid).sum(0) / schur)
        cost = torch.zeros(n, dtype=torch.float64).index_add_(0, owner[keep], (new * new).sum(0) / torch.diagonal(hkk_inv).clamp_min(1e-30))
        gain[kept_units] = -1.0
        cost[~kept_units] = float("inf")
        adds = gain.argsort(descending=True)[: min(candidates, int((~kept_units).sum()))]
        drops = cost.argsort()[: min(candidates, int(kept_units.sum()))]
        improved = False
        for a in adds.tolist():
            for r in drops.tolist():
                if par is not None and int(par[a]) != int(par[r]):
                    continue
                trial_units = kept_units.clone()
                trial_units[a], trial_units[r] = True, False
                trial = _columns(unit_cols, trial_units.nonzero().flatten())
                trial_new = refit_kept(weight, h, trial)
                err, _ = structured_error(weight, trial, trial_new, h)
                if err < best * (1 - 1e-9):
                    keep, new, best, kept_units, improved = trial, trial_new, err, trial_units, True
                    break
            if improved:
                break
        if not improved:
            break
        done += 1
    err, rel = structured_error(weight, keep, new, xtx)
    info = dict(choice.info, error=err, rel_error=rel, swaps=done, method=f"{choice.info.get('method', '?')}+swap")
    if units is not None:
        info["kept_units"] = kept_units.nonzero().flatten().tolist()
    return ChannelChoice(keep, new.to(weight.dtype), choice.bias_delta, info)


def _choose(score: Tensor, keep: int, units: Tensor | None, parents: Tensor | None, name: str) -> tuple[Tensor, list[int] | None]:
    """Kept columns for per-column ``score``: the best columns, or the best units by their summed score."""
    if units is None and parents is None:
        return torch.sort(score.argsort(descending=True)[:keep]).values, None
    cols = _units(score.numel(), units)
    if not 1 <= keep <= cols.shape[0]:
        raise ConfigError(f"{name}: cannot keep {keep} of {cols.shape[0]} units; keep between 1 and {cols.shape[0]}.")
    chosen = _pick_per_parent(score[cols].sum(1), keep, parents, name)
    return _columns(cols, chosen), chosen.tolist()


def wanda_sp(
    weight: Tensor, stats: LayerStats, keep: int, *, name: str = "linear", units: Tensor | None = None, parents: Tensor | None = None, **_: Any
) -> ChannelChoice:
    """Keep the ``keep`` channels (units) with the largest ``Σ_i |W_ij| · ‖X_j‖`` (summed over a unit); weights unchanged."""
    if units is None:
        _check(weight, stats, keep, name)
    score = weight.abs().double().sum(0) * stats.col_sq.double().clamp_min(0).sqrt()
    kept, chosen = _choose(score, keep, units, parents, name)
    new = weight[:, kept].clone()
    info: dict[str, Any] = {"method": "wanda-sp"}
    if chosen is not None:
        info["kept_units"] = chosen
    if stats.xtx is not None:
        info["error"], info["rel_error"] = structured_error(weight, kept, new, stats.xtx)
    return ChannelChoice(kept, new, info=info)


def flap(
    weight: Tensor, stats: LayerStats, keep: int, *, name: str = "linear", units: Tensor | None = None, parents: Tensor | None = None, **_: Any
) -> ChannelChoice:
    """FLAP: keep the channels (units) with the largest ``Var(X_j) · ‖W_j‖²`` (summed over a unit);
    the removed channels' mean contribution ``W[:, S] · mean(X_S)`` moves into the bias."""
    if units is None:
        _check(weight, stats, keep, name)
    if stats.col_sum is None:
        raise SolverError(f"{name}: FLAP needs the per-channel input mean; the observers did not collect it.")
    n = max(stats.count, 1)
    mean = stats.col_sum.double() / n
    var = (stats.col_sq.double() / n - mean * mean).clamp_min(0)
    score = var * (weight.double() ** 2).sum(0)
    kept, chosen = _choose(score, keep, units, parents, name)
    gone = torch.ones(weight.shape[1], dtype=torch.bool)
    gone[kept] = False
    delta = (weight.double()[:, gone] @ mean[gone]).to(weight.dtype)
    new = weight[:, kept].clone()
    info: dict[str, Any] = {"method": "flap"}
    if chosen is not None:
        info["kept_units"] = chosen
    if stats.xtx is not None:  # with the bias: ‖R‖² − 2 δ·(Σ_t r_t) + n‖δ‖², r_t the residual of token t
        full = _spread(weight, kept, new)
        err, _rel = reconstruction_error(weight, full, stats.xtx)
        base, _one = reconstruction_error(weight, torch.zeros_like(full), stats.xtx)  # ‖W X‖²
        d = delta.double()
        err = max(err - 2 * float(d @ ((weight.double() - full) @ stats.col_sum.double())) + n * float(d @ d), 0.0)
        info["error"], info["rel_error"] = err, err / max(base, 1e-30)
    return ChannelChoice(kept, new, delta, info)


def channel_scores(method: str, weight: Tensor, stats: LayerStats, *, damp: float = 0.01) -> Tensor:
    """Per-channel importance that adaptive budgets compare across layers (larger = keep).

    ``obs``/``obs-swap``: the relative error of removing the channel alone,
    ``‖W_j‖² / [H⁻¹]_jj / tr(W H Wᵀ)``; ``wanda-sp`` and ``flap``: their scores divided by the
    layer's mean score (each layer's channels relative to that layer).
    """
    w = weight.double()
    if method in ("obs", "obs-swap"):
        h = damped_hessian(stats, damp)
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        base = float(torch.einsum("ij,jk,ik->", w, h, w))
        return ((w * w).sum(0) / torch.diagonal(hinv).clamp_min(1e-30) / max(base, 1e-30)).float()
    if method == "flap":
        if stats.col_sum is None:
            raise SolverError("FLAP needs the per-channel input mean; the observers did not collect it.")
        n = max(stats.count, 1)
        mean = stats.col_sum.double() / n
        score = (stats.col_sq.double() / n - mean * mean).clamp_min(0) * (w * w).sum(0)
    else:
        score = w.abs().sum(0) * stats.col_sq.double().clamp_min(0).sqrt()
    return (score / score.mean().clamp_min(1e-30)).float()


def _obs(weight: Tensor, stats: LayerStats, keep: int, **kw: Any) -> ChannelChoice:
    options = {k: kw[k] for k in ("damp", "steps", "name", "units", "parents") if k in kw}
    return structured_obs(weight, stats, keep, **options)


def _obs_swap(weight: Tensor, stats: LayerStats, keep: int, **kw: Any) -> ChannelChoice:
    first = _obs(weight, stats, keep, **kw)
    options = {k: kw[k] for k in ("swaps", "candidates", "damp", "name", "units", "parents") if k in kw}
    return swap_refine(weight, stats, first, **options)


#: ``--structured-method`` names -> solver(weight, stats, keep, **options)
STRUCTURED_METHODS: dict[str, Callable[..., ChannelChoice]] = {
    "obs": _obs,
    "obs-swap": _obs_swap,
    "wanda-sp": wanda_sp,
    "flap": flap,
}


def get_structured(method: str) -> Callable[..., ChannelChoice]:
    try:
        return STRUCTURED_METHODS[method]
    except KeyError:
        raise ConfigError(f"unknown structured method {method!r}; choose one of {', '.join(STRUCTURED_METHODS)}.") from None


__all__ = [
    "STRUCTURED_METHODS",
    "ChannelChoice",
    "channel_scores",
    "damped_hessian",
    "flap",
    "get_structured",
    "refit_kept",
    "structured_error",
    "structured_obs",
    "swap_refine",
    "wanda_sp",
]
