"""Rotation math: PCA, Hadamard constructions, Cayley SGD on the Stiefel manifold, the learned objective."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.solvers import SparsitySpec
from graphprune.solvers.rotation import (
    ReaderSet,
    RotationProblem,
    WriterSet,
    cayley_sgd_step,
    hadamard_matrix,
    learn_rotation,
    orthonormality_error,
    pca_rotation,
    random_hadamard,
    random_orthogonal,
    rotation_objective,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # many tiny matmuls: one thread avoids thread hand-off costs on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pca_sorts_eigenvectors_by_variance() -> None:
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 0.1, 3.0, 1.0, 0.5], dtype=torch.float64)
    basis = random_orthogonal(5, gen)
    x = torch.randn(4000, 5, generator=gen, dtype=torch.float64) * scales @ basis.T
    cov = x.T @ x / x.shape[0]
    q, vals = pca_rotation(cov)
    assert orthonormality_error(q) < 1e-12
    assert torch.all(vals[:-1] >= vals[1:])
    torch.testing.assert_close(q.T @ cov @ q, torch.diag(vals), atol=1e-10, rtol=0)
    rotated = x @ q  # energy of the rotated coordinates falls off
    energy = rotated.pow(2).mean(0)
    assert torch.all(energy[:-1] >= energy[1:] - 1e-9)
    assert abs(float(q[:, 0] @ basis[:, 0])) > 0.99  # the 5.0 direction comes first


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 72, 576])
def test_hadamard_constructions(n: int) -> None:
    h = hadamard_matrix(n)
    assert h is not None
    assert torch.all(h.abs() == 1)
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=3))
def test_random_hadamard_is_orthonormal_for_any_width(n: int, seed: int) -> None:
    q = random_hadamard(n, torch.Generator().manual_seed(seed))
    assert q.shape == (n, n)
    assert orthonormality_error(q) < 1e-10
    if hadamard_matrix(n) is not None:  # a true Hadamard rotation: every entry is ±1/√n
        torch.testing.assert_close(q.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


def test_cayley_sgd_keeps_q_orthonormal_and_descends() -> None:
    """Procrustes on SO(n): minimise ‖Q − R‖² from Q = I; Q stays orthonormal at every step."""
    gen = torch.Generator().manual_seed(0)
    r = random_orthogonal(24, gen)
    if torch.linalg.det(r) < 0:
        r[:, 0] = -r[:, 0]  # reachable from I by rotations
    q = torch.eye(24, dtype=torch.float64)
    buf = None
    losses = []
    for step in range(150):
        qv = q.clone().requires_grad_(True)
        loss = (qv - r).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, qv)
        q, buf = cayley_sgd_step(q, grad, 0.2 * (1 - step / 150), buf, momentum=0.5)
        assert orthonormality_error(q) < 1e-5
        losses.append(float(loss.detach()))
    assert losses[-1] < 1e-3 * losses[0]


def test_cayley_sgd_on_a_stiefel_matrix() -> None:
    """Non-square Q (n > p) stays on the Stiefel manifold; float32 input drifts are cleaned by QR."""
    gen = torch.Generator().manual_seed(1)
    q = random_orthogonal(10, gen)[:, :4].float()
    buf = None
    for _ in range(50):
        q, buf = cayley_sgd_step(q, torch.randn(10, 4, generator=gen), 0.1, buf)
        assert orthonormality_error(q) < 1e-5


def _problem(blocks: int = 3, d: int = 16, gen: torch.Generator | None = None) -> RotationProblem:
    gen = gen or torch.Generator().manual_seed(0)
    # an outlier channel in the stream, as in real LLMs
    x = torch.randn(blocks, 400, d, generator=gen)
    x[..., 3] *= 8
    z = torch.randn(blocks, 400, 2 * d, generator=gen)
    cx = x.transpose(1, 2) @ x / 400
    cz = z.transpose(1, 2) @ z / 400
    return RotationProblem(
        [ReaderSet(cx, torch.randn(blocks, 3 * d, d, generator=gen), [d, d, d])],
        [WriterSet(torch.randn(blocks, d, 2 * d, generator=gen), cz)],
    )


def test_objective_matches_the_pruned_layer_error_definition() -> None:
    """rotation_objective == mean over Linears of ‖(Ŵ − W')X'ᵀ‖² / ‖WXᵀ‖², Ŵ the Wanda-pruned rotated weight."""
    gen = torch.Generator().manual_seed(2)
    prob = _problem(2, 8, gen)
    q = random_orthogonal(8, gen).float()
    spec = SparsitySpec(0.5)
    expected = []
    for b in range(2):
        cov, w_all = prob.readers[0].cov[b], prob.readers[0].weight[b]
        for w in w_all.split(8):
            wr = w @ q
            cq = q.T @ cov @ q
            mask = spec.keep_mask(wr.abs() * torch.diagonal(cq).sqrt())
            e = wr - wr * mask
            expected.append(torch.trace(e @ cq @ e.T) / torch.trace(w @ cov @ w.T))
        w, cz = prob.writers[0].weight[b], prob.writers[0].cov[b]
        wr = q.T @ w
        mask = spec.keep_mask(wr.abs() * torch.diagonal(cz).sqrt())
        e = wr - wr * mask
        expected.append(torch.trace(e @ cz @ e.T) / torch.trace(w @ cz @ w.T))
    got = rotation_objective(q, prob, spec)
    torch.testing.assert_close(got, torch.stack(expected).mean(), rtol=1e-4, atol=1e-7)


def test_learned_rotation_lowers_the_objective_and_stays_orthonormal() -> None:
    prob = _problem()
    spec = SparsitySpec(0.5)
    q0 = torch.eye(16, dtype=torch.float64)
    seen = []
    res = learn_rotation(q0, prob, spec, steps=25, lr=0.1, blocks_per_step=2, callback=lambda s, _loss: seen.append(s))
    assert seen == list(range(25))
    assert not res.kept_initial and res.final_loss < res.initial_loss
    assert orthonormality_error(res.q) < 1e-5
    torch.testing.assert_close(torch.tensor(res.final_loss, dtype=torch.float64), rotation_objective(res.q.float(), prob, spec).double(), rtol=1e-5, atol=0)


def test_learned_rotation_never_returns_a_worse_q() -> None:
    prob = _problem()
    spec = SparsitySpec(0.5)
    q0 = torch.eye(16, dtype=torch.float64)
    res = learn_rotation(q0, prob, spec, steps=3, lr=3.0, momentum=0.0)  # absurd steps: may get worse
    assert res.final_loss <= res.initial_loss
    if res.kept_initial:
        assert torch.equal(res.q, q0)


def test_obs_objective_is_the_exact_single_removal_error() -> None:
    """score="obs" with one weight dropped per row: the chosen weight and the error equal the
    brute-force best single removal with the other weights optimally refitted (H undamped)."""
    gen = torch.Generator().manual_seed(5)
    d, rows = 6, 5
    a = torch.randn(40, d, generator=gen, dtype=torch.float64)
    cov = (a.T @ a / 40)  # correlated inputs
    w = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    q = random_orthogonal(d, gen)
    prob = RotationProblem(readers=[ReaderSet(cov[None], w[None], [rows])])
    spec = SparsitySpec(1 / d)  # one weight of each row removed
    got = rotation_objective(q, prob, spec, score="obs", damp=0.0)
    wr, hq = w @ q, q.T @ cov @ q
    total = 0.0
    for r in range(rows):
        best = math.inf
        for j in range(d):  # remove weight j, refit the rest exactly: min over u of (wr - u) Hq (wr - u)ᵀ, u_j = 0
            keep = [k for k in range(d) if k != j]
            # optimal kept weights: u_K = wr_K + wr_j Hq[j, K] Hq[K, K]⁻¹
            u_k = wr[r, keep] + wr[r, j] * torch.linalg.solve(hq[keep][:, keep], hq[keep, j])
            u = torch.zeros(d, dtype=torch.float64)
            u[keep] = u_k
            e = wr[r] - u
            best = min(best, float(e @ hq @ e))
        total += best
    expected = total / float(torch.einsum("ri,ij,rj->", w, cov, w))
    assert abs(float(got) - expected) < 1e-9 * max(1.0, expected)


def test_obs_objective_equals_the_wanda_error_for_decorrelated_inputs() -> None:
    """With a diagonal Gram matrix no removed weight can be compensated: OBS saliency = Wanda error."""
    gen = torch.Generator().manual_seed(6)
    d = 8
    cov = torch.diag(torch.rand(d, generator=gen, dtype=torch.float64) + 0.1)[None]
    w = torch.randn(1, 12, d, generator=gen, dtype=torch.float64)
    prob = RotationProblem(readers=[ReaderSet(cov, w, [12])])
    eye = torch.eye(d, dtype=torch.float64)
    spec = SparsitySpec(0.5)
    obs = rotation_objective(eye, prob, spec, score="obs", damp=0.0)
    wanda = rotation_objective(eye, prob, spec, score="wanda")
    torch.testing.assert_close(obs, wanda, rtol=1e-10, atol=0)


def test_learned_obs_rotation_lowers_the_obs_objective_and_stays_orthonormal() -> None:
    prob = _problem()
    spec = SparsitySpec(0.5)
    res = learn_rotation(torch.eye(16, dtype=torch.float64), prob, spec, steps=20, lr=0.1, blocks_per_step=2, score="obs")
    assert not res.kept_initial and res.final_loss < res.initial_loss
    assert orthonormality_error(res.q) < 1e-5


def _half_zero_problem(blocks: int, d: int, gen: torch.Generator) -> RotationProblem:
    """Every weight row has exactly half its entries zero in the identity basis, so 50 %
    pruning there costs nothing, and any rotation that mixes channels costs more."""

    def half_zero(*shape: int) -> torch.Tensor:
        w = torch.randn(*shape, generator=gen)
        keep = torch.rand(*shape, generator=gen).argsort(-1) < shape[-1] // 2
        return w * keep

    base = _problem(blocks, d, gen)
    return RotationProblem(
        [ReaderSet(base.readers[0].cov, half_zero(blocks, 3 * d, d), [d, d, d])],
        [WriterSet(half_zero(blocks, d, 2 * d), base.writers[0].cov)],
    )


def test_heldout_stopping_stops_when_the_heldout_objective_rises() -> None:
    """The fit objective falls under Cayley SGD while the held-out one (zero at the start,
    positive anywhere else) rises: learning stops after `patience` checks and returns q0."""
    prob = _problem()
    spec = SparsitySpec(0.5)
    q0 = torch.eye(16, dtype=torch.float64)
    held = _half_zero_problem(3, 16, torch.Generator().manual_seed(9))
    assert float(rotation_objective(q0.float(), held, spec)) == 0.0
    free = learn_rotation(q0, prob, spec, steps=40, lr=0.1, blocks_per_step=2)
    assert free.final_loss < free.initial_loss and float(rotation_objective(free.q.float(), held, spec)) > 0.0
    seen: list[int] = []
    res = learn_rotation(q0, prob, spec, steps=40, lr=0.1, blocks_per_step=2, heldout=held, check_every=5, patience=2,
                         callback=lambda s, _loss: seen.append(s))
    assert [step for step, _ in res.heldout] == [0, 5, 10]
    assert res.heldout[0][1] == 0.0 and all(v > 0.0 for _, v in res.heldout[1:])
    assert res.stopped_at == 10 and seen == list(range(10))  # stopped: no step after the second failed check
    assert res.kept_initial and res.best_step == 0 and torch.equal(res.q, q0)
    assert res.final_loss == pytest.approx(res.initial_loss)


def test_heldout_stopping_keeps_the_best_checked_rotation() -> None:
    """Held-out statistics that agree with the fit ones: learning runs on and returns the
    checked Q with the lowest held-out objective."""
    prob = _problem()
    held = _problem(gen=torch.Generator().manual_seed(1))  # fresh samples of the same distribution and weights' law
    held = RotationProblem([ReaderSet(held.readers[0].cov, prob.readers[0].weight, [16, 16, 16])],
                           [WriterSet(prob.writers[0].weight, held.writers[0].cov)])
    spec = SparsitySpec(0.5)
    q0 = torch.eye(16, dtype=torch.float64)
    res = learn_rotation(q0, prob, spec, steps=20, lr=0.1, blocks_per_step=2, heldout=held, check_every=5, patience=2)
    values = dict(res.heldout)
    assert [s for s, _ in res.heldout] == list(range(0, res.stopped_at + 1, 5))
    assert res.best_step == min(values, key=lambda s: values[s]) and res.best_step > 0
    assert float(rotation_objective(res.q.float(), held, spec)) == pytest.approx(values[res.best_step], rel=1e-5)
    assert values[res.best_step] < values[0] and not res.kept_initial
    assert orthonormality_error(res.q) < 1e-5
    with pytest.raises(Exception, match="held-out statistics cover 2 blocks"):
        learn_rotation(q0, prob, spec, steps=2, heldout=_problem(blocks=2))
