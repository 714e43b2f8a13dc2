"""Orthonormal rotations of the residual stream: pure tensor math, no graph.

* :func:`pca_rotation` -- eigenvectors of a covariance (SliceGPT), float64, columns sorted by
  eigenvalue descending, each column's sign fixed so its largest entry is positive.
* :func:`hadamard_matrix` -- a ±1 matrix ``H`` with ``HHᵀ = nI`` for every order we can build:
  Sylvester (powers of two), Paley I (``q + 1``, ``q`` prime ≡ 3 mod 4), Paley II
  (``2(q + 1)``, ``q`` prime ≡ 1 mod 4) and Kronecker products of those. SmolLM2's 576 is
  ``2·2·2·72`` with 72 from Paley I (q = 71).
* :func:`random_hadamard` -- QuaRot's random Hadamard ``H·diag(s)/√n`` with random signs
  ``s``. For an order with no known construction here (``n`` not a multiple of 4, or a
  multiple we cannot build) it falls back to a *Hadamard-Kronecker* rotation
  ``(H_a/√a) ⊗ R_b · diag(s)``: ``a`` the largest buildable Hadamard order dividing ``n``
  and ``R_b`` a Haar-random orthogonal ``b×b`` matrix (``b = n/a``); with ``a = 1`` this is
  a plain random orthogonal matrix. It is exactly orthogonal; it spreads outliers over
  blocks of ``b`` instead of evenly.
* :func:`cayley_sgd_step` -- one step of (momentum) SGD on the Stiefel manifold with the
  Cayley retraction (Li, Fuxin & Todorovic 2020; used by SpinQuant/RotPruner).
* :func:`learn_rotation` -- RotPruner-style search for ``Q``: minimise the layer-wise
  reconstruction error of the *pruned* rotated Linears (see :class:`RotationProblem`)
  with Cayley SGD, base weights frozen, the mask recomputed every step and passed
  straight through (the gradient sees it as a constant).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from graphprune.errors import SolverError
from graphprune.solvers.spec import SparsitySpec

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- checks
def orthonormality_error(q: Tensor) -> float:
    """``max |QᵀQ − I|`` (columns orthonormal)."""
    q64 = q.double()
    return float((q64.T @ q64 - torch.eye(q.shape[1], dtype=torch.float64, device=q.device)).abs().max())


def reorthonormalize(q: Tensor) -> Tensor:
    """The closest-in-spirit orthonormal matrix: QR with the signs of R's diagonal made positive."""
    qq, r = torch.linalg.qr(q.double())
    return qq * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=torch.float64))


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A Haar-random orthogonal ``n×n`` matrix (float64)."""
    return reorthonormalize(torch.randn(n, n, generator=generator, dtype=torch.float64))


# ---------------------------------------------------------------------------- PCA
def pca_rotation(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of the symmetric PSD ``cov [d, d]`` as columns, by eigenvalue descending.

    Returns:
        ``(Q [d, d] float64 orthogonal, eigenvalues [d] float64 descending)``. Rotating a
        row vector ``x -> xQ`` puts its principal component first.
    """
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise SolverError(f"PCA needs a square covariance, got shape {tuple(cov.shape)}.")
    c = cov.double()
    if not torch.isfinite(c).all():
        raise SolverError("the stream covariance contains NaN/Inf; the calibration activations overflowed.")
    c = 0.5 * (c + c.T)
    vals, vecs = torch.linalg.eigh(c)
    order = torch.argsort(vals, descending=True)
    vals, vecs = vals[order], vecs[:, order]
    # deterministic signs: the largest-magnitude entry of each eigenvector is positive
    idx = vecs.abs().argmax(0)
    signs = torch.sign(vecs[idx, torch.arange(vecs.shape[1])])
    return vecs * torch.where(signs == 0, torch.ones_like(signs), signs), vals


# ---------------------------------------------------------------------------- Hadamard
def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(math.isqrt(n)) + 1))


def _jacobsthal(q: int) -> Tensor:
    """``Q_ij = χ(j − i)`` with χ the Legendre symbol mod the prime ``q``."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0] + [1 if k in squares else -1 for k in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> Tensor:
    """Order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``: ``H = I + S``, S skew (conference)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> Tensor:
    """Order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` from the symmetric conference matrix."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@lru_cache(maxsize=None)
def _hadamard(n: int) -> Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4:
        return None
    if n & (n - 1) == 0:  # Sylvester
        h = _hadamard(n // 2)
        assert h is not None
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley1(n - 1)
    if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley2(n // 2 - 1)
    for a in range(2, n // 2 + 1):
        if n % a == 0:
            ha, hb = _hadamard(a), _hadamard(n // a)
            if ha is not None and hb is not None:
                return torch.kron(ha, hb)
    return None


def hadamard_matrix(n: int) -> Tensor | None:
    """A ±1 ``n×n`` float64 matrix with ``HHᵀ = nI``, or None when no construction here applies."""
    if n < 1:
        raise SolverError(f"a Hadamard matrix needs order >= 1, got {n}.")
    h = _hadamard(n)
    return None if h is None else h.clone()


def random_hadamard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """An orthogonal ``n×n`` float64 rotation ``H·diag(s)/√n`` (see the module docstring for other orders)."""
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    h = hadamard_matrix(n)
    if h is not None:
        return h / math.sqrt(n) * signs
    a = max(k for k in range(1, n + 1) if n % k == 0 and _hadamard(k) is not None)
    ha = _hadamard(a)
    assert ha is not None
    q = torch.kron((ha / math.sqrt(a)).contiguous(), random_orthogonal(n // a, generator).contiguous())
    return q * signs


# ---------------------------------------------------------------------------- Cayley SGD
def cayley_sgd_step(
    q: Tensor,
    grad: Tensor,
    lr: float,
    buf: Tensor | None = None,
    momentum: float = 0.9,
    normalize: bool = True,
    tol: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """One descent step on the Stiefel manifold ``{Q ∈ R^{n×p}: QᵀQ = I}``.

    The Euclidean gradient ``G`` is turned into the skew matrix
    ``A = Ŵ − Ŵᵀ``, ``Ŵ = G Qᵀ − ½ Q (Qᵀ G Qᵀ)``, whose flow ``−A Q`` is the steepest descent
    direction on the manifold; momentum accumulates ``A`` (a sum of skew matrices is skew)
    and the Cayley retraction ``Q' = (I + lr/2·M)⁻¹ (I − lr/2·M) Q`` keeps ``Q'`` orthonormal
    exactly in exact arithmetic (the solve is float64). Drift beyond ``tol`` is removed by QR.

    Args:
        q: current point ``[n, p]`` (float64 recommended).
        grad: Euclidean gradient of the loss at ``q``, same shape.
        lr: step size; with ``normalize`` the rotation angle of the step (Frobenius norm of
            ``lr·A``), which makes it independent of the loss's scale.
        buf: momentum buffer from the previous step (None at the first).
        momentum: momentum coefficient in [0, 1).
        normalize: scale ``A`` to unit Frobenius norm before the momentum update.
        tol: re-orthonormalise when ``max |QᵀQ − I|`` exceeds this.

    Returns:
        ``(new q, momentum buffer)``.
    """
    if q.shape != grad.shape or q.dim() != 2 or q.shape[0] < q.shape[1]:
        raise SolverError(f"Cayley step needs q and grad of the same shape [n, p] with n >= p, got {tuple(q.shape)} and {tuple(grad.shape)}.")
    q64, g = q.double(), grad.double()
    w_hat = g @ q64.T - 0.5 * q64 @ (q64.T @ g @ q64.T)
    a = w_hat - w_hat.T
    if normalize:
        a = a / a.norm().clamp_min(1e-30)
    buf = a if buf is None else momentum * buf.double() + a
    eye = torch.eye(q.shape[0], dtype=torch.float64, device=q.device)
    half = 0.5 * lr * buf
    new = torch.linalg.solve(eye + half, (eye - half) @ q64)
    if orthonormality_error(new) > tol:
        new = reorthonormalize(new)
    return new, buf


# ---------------------------------------------------------------------------- learned rotation
def _row_quad(e: Tensor, cov: Tensor) -> Tensor:
    """Per row of ``e [B, rows, k]``: ``e_r cov e_rᵀ`` -> ``[B, rows]``."""
    return ((e @ cov) * e).sum(-1)


@dataclass
class ReaderSet:
    """One reader group per block, stacked over blocks: Linears reading the same norm output.

    Attributes:
        cov: ``[B, d, d]`` mean Gram matrix ``XᵀX/n`` of the norm's output ``X`` per block.
        weight: ``[B, rows, d]`` the group's weights stacked along rows (q; k; v).
        splits: rows of each Linear in ``weight`` (errors are relative per Linear).
    """

    cov: Tensor
    weight: Tensor
    splits: list[int]
    ref: Tensor = field(init=False)  # [B, rows]: each row's unpruned output energy

    def __post_init__(self) -> None:
        if self.cov.dim() != 3 or self.weight.dim() != 3 or self.weight.shape[-1] != self.cov.shape[-1]:
            raise SolverError(f"reader set: weight {tuple(self.weight.shape)} and cov {tuple(self.cov.shape)} do not match.")
        if sum(self.splits) != self.weight.shape[1]:
            raise SolverError(f"reader set: splits {self.splits} do not add up to {self.weight.shape[1]} rows.")
        self.ref = _row_quad(self.weight, self.cov)


@dataclass
class WriterSet:
    """One writer per block, stacked: ``weight [B, d, in]``, input Gram ``cov [B, in, in]``."""

    weight: Tensor
    cov: Tensor
    ref: Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.cov.dim() != 3 or self.weight.dim() != 3 or self.weight.shape[-1] != self.cov.shape[-1]:
            raise SolverError(f"writer set: weight {tuple(self.weight.shape)} and cov {tuple(self.cov.shape)} do not match.")
        self.ref = _row_quad(self.weight, self.cov)


@dataclass
class RotationProblem:
    """The Linears around the stream, stacked over ``blocks`` decoder blocks of equal shape.

    Readers are rotated ``W -> WQ`` with inputs ``X -> XQ``; writers ``W -> QᵀW`` with
    inputs unchanged.
    """

    readers: list[ReaderSet] = field(default_factory=list)
    writers: list[WriterSet] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        sets = [r.cov for r in self.readers] + [w.cov for w in self.writers]
        return int(sets[0].shape[0]) if sets else 0

    def select(self, idx: Tensor) -> "RotationProblem":
        """The same problem restricted to the blocks ``idx``."""
        out = RotationProblem()
        for r in self.readers:
            rs = object.__new__(ReaderSet)
            rs.cov, rs.weight, rs.splits, rs.ref = r.cov[idx], r.weight[idx], r.splits, r.ref[idx]
            out.readers.append(rs)
        for w in self.writers:
            ws = object.__new__(WriterSet)
            ws.weight, ws.cov, ws.ref = w.weight[idx], w.cov[idx], w.ref[idx]
            out.writers.append(ws)
        return out


def _relative(err_rows: Tensor, ref_rows: Tensor, splits: list[int]) -> Tensor:
    """Sum over Linears (row segments) and blocks of err/ref."""
    total = err_rows.new_zeros(())
    for err, ref in zip(err_rows.split(splits, dim=1), ref_rows.split(splits, dim=1)):
        total = total + (err.sum(1) / ref.sum(1).clamp_min(1e-30)).sum()
    return total


def _drop_mask(score: Tensor, spec: SparsitySpec) -> Tensor:
    flat = score.reshape(-1, score.shape[-1])
    return (~spec.keep_mask(flat)).reshape(score.shape)


SCORES = ("wanda", "magnitude", "obs")


def _damped_inverse(cov: Tensor, damp: float) -> Tensor:
    """``(cov + damp · mean(diag cov) · I)⁻¹`` per block of ``cov [B, d, d]`` (no gradient).

    The damping is rotation invariant (the trace is), so ``Qᵀ(cov_damped)⁻¹Q`` is the damped
    inverse of the rotated Gram matrix.
    """
    d = cov.shape[-1]
    diag_mean = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    damped = cov.double() + (damp * diag_mean.double())[:, None, None] * eye.double()
    return torch.cholesky_inverse(torch.linalg.cholesky(damped)).to(cov.dtype)


def rotation_objective(q: Tensor, problem: RotationProblem, spec: SparsitySpec, score: str = "wanda", damp: float = 0.01) -> Tensor:
    """Mean relative error of the pruned rotated Linears (differentiable in ``q``).

    ``score`` picks the pruning method the rotation is learned for:

    * ``"wanda"`` / ``"magnitude"`` (no weight update after pruning): the error is
      ``‖(M ⊙ WQ − WQ)(XQ)ᵀ‖² / ‖WXᵀ‖²`` for a reader and ``‖(M ⊙ QᵀW − QᵀW)Zᵀ‖² / ‖WZᵀ‖²``
      for a writer (``Q`` orthogonal, so this is the error in the original basis). ``M``
      drops the smallest ``|W|·‖X_j‖`` (``"magnitude"``: ``|W|``) in the rotated basis.
    * ``"obs"`` (solvers that update the kept weights from ``H = XᵀX``: SparseGPT, ALPS,
      proximal): the error of removing weight ``j`` of a row and optimally compensating
      with the others is ``w_j² / [H⁻¹]_jj`` (Optimal Brain Surgeon; SparseGPT's saliency).
      Rotating the inputs turns ``H⁻¹`` into ``QᵀH⁻¹Q``, so the objective is the sum of that
      saliency over the dropped weights (``M`` drops the smallest), relative to the row
      energy. Rotations that decorrelate the inputs (PCA) make ``[H⁻¹]_jj = 1/H_jj``, the
      saliency of Wanda: this score sees that compensation is lost, the other two do not.
      ``damp`` is SparseGPT's damping fraction.

    The mask is computed without gradient and passed straight through (a constant for
    the backward pass).
    """
    if score not in SCORES:
        raise SolverError(f"unknown rotation mask score {score!r}; use one of {', '.join(SCORES)}.")
    total = q.new_zeros(())
    count = 0
    for rs in problem.readers:
        cov_q = q.T @ rs.cov @ q  # [B, d, d]: Gram matrix of the rotated inputs
        wr = rs.weight @ q
        if score == "obs":
            inv = _damped_inverse(rs.cov, damp)
            dinv = ((inv @ q) * q).sum(-2)  # diag(Qᵀ H⁻¹ Q) [B, d]
            sal = wr.square() / dinv[:, None, :]
            with torch.no_grad():
                drop = _drop_mask(sal, spec)
            total = total + _relative((sal * drop).sum(-1), rs.ref, rs.splits)
        else:
            with torch.no_grad():
                norms = torch.diagonal(cov_q, dim1=-2, dim2=-1).clamp_min(0).sqrt()
                drop = _drop_mask(wr.abs() * norms[:, None, :] if score == "wanda" else wr.abs(), spec)
            total = total + _relative(_row_quad(wr * drop, cov_q), rs.ref, rs.splits)
        count += rs.weight.shape[0] * len(rs.splits)
    for ws in problem.writers:
        wr = q.T @ ws.weight  # [B, d, in]
        if score == "obs":
            dinv = torch.diagonal(_damped_inverse(ws.cov, damp), dim1=-2, dim2=-1)
            sal = wr.square() / dinv[:, None, :]
            with torch.no_grad():
                drop = _drop_mask(sal, spec)
            total = total + _relative((sal * drop).sum(-1), ws.ref, [ws.weight.shape[1]])
        else:
            with torch.no_grad():
                col = torch.diagonal(ws.cov, dim1=-2, dim2=-1).clamp_min(0).sqrt()
                drop = _drop_mask(wr.abs() * col[:, None, :] if score == "wanda" else wr.abs(), spec)
            total = total + _relative(_row_quad(wr * drop, ws.cov), ws.ref, [ws.weight.shape[1]])
        count += ws.weight.shape[0]
    return total / max(count, 1)


@dataclass
class LearnedRotation:
    """The result of :func:`learn_rotation`.

    ``initial_loss`` / ``final_loss`` are the full objective on the fitting statistics at the
    start and for the returned ``q``; ``heldout`` lists ``(step, held-out objective)`` at every
    check (step 0 is the start) when held-out statistics were given; ``best_step`` is the
    step whose ``q`` was returned and ``stopped_at`` the step learning stopped at.
    """

    q: Tensor
    initial_loss: float
    final_loss: float
    history: list[float]
    kept_initial: bool
    heldout: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    stopped_at: int = 0


def learn_rotation(
    q0: Tensor,
    problem: RotationProblem,
    spec: SparsitySpec,
    *,
    steps: int = 30,
    lr: float = 0.05,
    momentum: float = 0.9,
    blocks_per_step: int = 4,
    score: str = "wanda",
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
    heldout: RotationProblem | None = None,
    check_every: int = 5,
    patience: int = 2,
) -> LearnedRotation:
    """Optimise ``Q`` (from ``q0``) on the orthogonal group to minimise :func:`rotation_objective`.

    Each step evaluates the objective on ``blocks_per_step`` randomly chosen blocks (an
    unbiased estimate of the mean over blocks) in the statistics' dtype, and takes one
    normalised Cayley SGD step in float64 with a cosine-decaying step size.

    Without ``heldout``, the full objective is measured at ``q0`` and at the end; if learning
    did not lower it, ``q0`` is returned (``kept_initial``), so the result is never worse than
    its start on this objective.

    With ``heldout`` (the same problem with statistics of calibration tokens the steps never
    see), the full held-out objective is measured at ``q0`` and every ``check_every`` steps;
    learning stops once ``patience`` checks in a row did not improve on the best, and the
    ``Q`` with the lowest held-out objective is returned (``q0`` itself if no check beat it),
    so the result is never worse than its start on the held-out tokens.
    """
    blocks = problem.blocks
    if blocks == 0:
        raise SolverError("learned rotation needs at least one block of statistics.")
    if steps < 0 or lr <= 0:
        raise SolverError(f"learned rotation needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}.")
    if heldout is not None and (check_every < 1 or patience < 1):
        raise SolverError(f"held-out stopping needs check_every >= 1 and patience >= 1, got {check_every} and {patience}.")
    if heldout is not None and heldout.blocks != blocks:
        raise SolverError(f"the held-out statistics cover {heldout.blocks} blocks, the fitting ones {blocks}; build both from the same graph.")
    gen = torch.Generator().manual_seed(seed)
    dtype = (problem.readers[0].cov if problem.readers else problem.writers[0].cov).dtype

    def full(qx: Tensor, prob: RotationProblem) -> float:
        with torch.no_grad():
            return float(rotation_objective(qx.to(dtype), prob, spec, score))

    q = q0.double().clone()
    initial = full(q, problem)
    history: list[float] = []
    buf: Tensor | None = None
    k = min(blocks_per_step, blocks) if blocks_per_step > 0 else blocks
    checks: list[tuple[int, float]] = []
    best_q, best_step, stale = q.clone(), 0, 0
    if heldout is not None:
        checks.append((0, full(q, heldout)))
    stopped = steps
    for step in range(steps):
        pick = torch.randperm(blocks, generator=gen)[:k]
        qv = q.to(dtype).requires_grad_(True)
        loss = rotation_objective(qv, problem.select(pick), spec, score)
        (grad,) = torch.autograd.grad(loss, qv)
        rate = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        q, buf = cayley_sgd_step(q, grad, rate, buf, momentum)
        history.append(float(loss.detach()))
        if callback is not None:
            callback(step, history[-1])
        done = step + 1
        if heldout is not None and (done % check_every == 0 or done == steps):
            value = full(q, heldout)
            if value < min(v for _, v in checks):
                best_q, best_step, stale = q.clone(), done, 0
            else:
                stale += 1
            checks.append((done, value))
            if stale >= patience:
                stopped = done
                log.info("learned rotation: held-out objective did not improve for %d checks; stopped at step %d, kept step %d", patience, done, best_step)
                break
    if heldout is not None:
        final = full(best_q, problem)
        log.info("learned rotation: held-out objective %.5f -> %.5f (step %d of %d)", checks[0][1], min(v for _, v in checks), best_step, stopped)
        return LearnedRotation(best_q, initial, final, history, best_step == 0, checks, best_step, stopped)
    final = full(q, problem)
    log.info("learned rotation: objective %.5f -> %.5f in %d steps", initial, final, steps)
    if not final < initial:
        return LearnedRotation(q0.double().clone(), initial, initial, history, True, [], 0, steps)
    return LearnedRotation(q, initial, final, history, False, [], steps, steps)
