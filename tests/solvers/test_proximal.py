"""The proximal 2:4 operator against brute force, the proximal solver's pattern and error,
and masked gradient refinement's monotonicity."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from graphprune.errors import ConfigError, SolverError
from graphprune.solvers import LayerStats, SparsitySpec, get_solver
from graphprune.solvers.magnitude import magnitude_prune
from graphprune.solvers.proximal import nm_regularizer, prox_nm_group, proximal_nm_prune
from graphprune.solvers.refine import masked_gd_refine
from graphprune.solvers.wanda import wanda_prune

F64 = torch.float64
SPEC24 = SparsitySpec.parse(pattern="2:4")


def _correlated(rows: int, cols: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols, generator=g, dtype=F64)
    a = torch.randn(cols, cols, generator=g, dtype=F64) / math.sqrt(cols)
    return torch.randn(rows, cols, generator=g), (z @ a).float()


def _objective(u: torch.Tensor, z: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    return 0.5 * (u - z).square().sum(-1) + lam * nm_regularizer(u)


def _brute_force_prox(z: torch.Tensor, lam: torch.Tensor, grid: int = 17) -> torch.Tensor:
    """Global minimisers of ½‖u − z‖² + λ r(u) for groups ``z [n, 4]`` (``lam [n]``): a grid
    over the box between 0 and z (the minimiser lies there), then exact coordinate descent
    from the 8 best grid points of each group (each coordinate is a convex quadratic)."""
    t = torch.linspace(0, 1, grid, dtype=F64)
    y, sign = z.abs(), z.sign()
    pts = torch.cartesian_prod(t, t, t, t)[None] * y[:, None, :]  # [n, grid⁴, 4]
    f = _objective(pts, y[:, None, :], lam[:, None])
    v = torch.gather(pts, 1, f.argsort(dim=1)[:, :8, None].expand(-1, -1, 4)).clone()  # [n, 8, 4]
    for _ in range(300):
        for i in range(4):
            o = [j for j in range(4) if j != i]
            e2 = v[..., o[0]] * v[..., o[1]] + v[..., o[2]] * (v[..., o[0]] + v[..., o[1]])
            v[..., i] = (y[:, None, i] - lam[:, None] * e2).clamp_min(0)
    best = _objective(v, y[:, None, :], lam[:, None]).argmin(dim=1)
    return v[torch.arange(z.shape[0]), best] * sign


def test_registered():
    info = get_solver("proximal")
    assert info.fn is proximal_nm_prune and info.needs_hessian


def test_regularizer_is_the_sum_of_triple_products_and_zero_exactly_on_2_4_groups():
    g = torch.tensor([[1.0, -2.0, 0.0, 0.0], [0.0, 3.0, 0.0, -1.0], [1.0, 1.0, 1.0, 0.0], [1.0, -2.0, 3.0, 4.0]])
    assert nm_regularizer(g).tolist() == [0.0, 0.0, 1.0, 1 * 2 * 3 + 1 * 2 * 4 + 1 * 3 * 4 + 2 * 3 * 4]
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    z[z.abs() < 0.3] = 0
    brute = torch.stack([sum(abs(r[i] * r[j] * r[k]) for i, j, k in itertools.combinations(range(4), 3)) for r in z])
    assert torch.allclose(nm_regularizer(z), brute)
    assert torch.equal(nm_regularizer(z) == 0, (z != 0).sum(-1) <= 2)


@pytest.fixture(params=["native", "python"])
def prox_path(request, monkeypatch):
    """Run a test on the native operator (every case in C++) and on the Python operator
    alone."""
    import graphprune.solvers.proximal as prox
    from graphprune.kernels.packed import load_native

    if request.param == "python":
        monkeypatch.setattr(prox, "_native_prox", lambda: None)
    elif not load_native() or prox._native_prox() is None:
        from graphprune.kernels.packed import packed_unavailable_reason

        pytest.skip(f"the native operator library is not available here: {packed_unavailable_reason()}")
    return request.param


def test_prox_equals_brute_force(prox_path):
    """Random groups at four strengths (convex and non-convex regimes), plus near-ties."""
    g = torch.Generator().manual_seed(7)
    lams = torch.tensor([0.05, 0.4, 1.0, 3.0], dtype=F64).repeat_interleave(6)
    z = torch.randn(24, 4, generator=g, dtype=F64)
    z[::6] = torch.tensor([1.0, -1.0 + 1e-3, 1.0 - 2e-3, -1.0 + 3e-3], dtype=F64)  # near-tie: the hard case
    out = prox_nm_group(z, lams)
    ref = _brute_force_prox(z, lams)
    f_out, f_ref = _objective(out, z, lams), _objective(ref, z, lams)
    assert (f_out <= f_ref + 1e-12 * (1 + f_ref.abs())).all()
    assert torch.allclose(out, ref, atol=1e-6), (z, out, ref)
    assert ((out != 0).sum(-1) == 2).any() and ((out != 0).sum(-1) == 3).any() and ((out != 0).sum(-1) == 4).any()


def test_native_and_python_operators_agree(monkeypatch):
    """The native operator computes every case the Python operator does (screen, convex
    descent, three and four non-zeros); on many groups across the regimes (zeros, ties,
    λ = 0, strengths from convex to far past it) both give the same answer to rounding,
    float32 input included. Groups it flags as pending are completed by the Python code."""
    import graphprune.solvers.proximal as prox
    from graphprune.kernels.packed import load_native

    load_native()
    native = prox._native_prox()
    if native is None:
        from graphprune.kernels.packed import packed_unavailable_reason

        pytest.skip(f"the native operator library is not available here: {packed_unavailable_reason()}")
    g = torch.Generator().manual_seed(11)
    z = torch.randn(20000, 4, generator=g, dtype=F64) * torch.rand(20000, 1, generator=g, dtype=F64) * 3
    z[:500, 2:] = 0  # already 2:4
    z[500:1000] = z[500:1000, :1]  # four equal magnitudes (signs kept)
    z[1000:1100] = 0
    z[1100:1600] = torch.tensor([1.0, -1.0 + 1e-3, 1.0 - 2e-3, -1.0 + 3e-3], dtype=F64)  # near-ties
    lam = torch.logspace(-4, 1, 20000, dtype=F64)[torch.randperm(20000, generator=g)]
    lam[:200] = 0
    y = z.abs().sort(-1, descending=True).values
    nonconvex = (2 * lam * y[:, :3].sum(-1) >= 1) & (y[:, 2] > 0)
    out, pending = native(z.contiguous(), lam.contiguous())
    python = prox._prox_groups(z, lam)
    tol = 1e-11 * (1 + float(z.abs().max()))
    assert not pending.any() and nonconvex.float().mean() > 0.2
    assert torch.allclose(out, python, rtol=0, atol=tol)
    assert ((python != 0).sum(-1) == 3).any() and ((python != 0).sum(-1) == 4).any()  # every support size met
    out32, _ = native(z.float().contiguous(), lam.contiguous())
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), prox._prox_groups(z.float().double(), lam), rtol=0, atol=1e-6)

    def flagging(zz, ll):  # a native result with every third group left to Python
        o, p = native(zz, ll)
        p[::3] = True
        o[::3] = 0
        return o, p

    monkeypatch.setattr(prox, "_native_prox", lambda: flagging)
    assert torch.allclose(prox._prox(z, lam), python, rtol=0, atol=tol)


def test_prox_structure(prox_path):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 3, 4, generator=g)
    assert torch.equal(prox_nm_group(z, 0.0), z)  # λ = 0: identity
    big = prox_nm_group(z, 1e4)  # λ large: keep the two largest magnitudes, unchanged
    assert torch.equal(big, z * SPEC24.keep_mask(z.abs().reshape(5, 12)).reshape(5, 3, 4))
    mid = prox_nm_group(z, 0.7)
    assert mid.shape == z.shape and mid.dtype == z.dtype
    assert ((mid == 0) | (mid.sign() == z.sign())).all()  # signs kept
    assert (mid.abs() <= z.abs() + 1e-7).all()  # shrinks
    already = torch.tensor([[0.0, 2.0, -1.0, 0.0]])
    assert torch.equal(prox_nm_group(already, 5.0), already)  # 2:4 groups are fixed points
    per_group = prox_nm_group(z.double(), torch.tensor([[0.0, 1.0, 1e4]] * 5, dtype=F64))
    assert torch.equal(per_group[:, 0], z[:, 0].double())
    with pytest.raises(ConfigError, match="groups of 4"):
        prox_nm_group(torch.randn(3, 5), 1.0)
    with pytest.raises(ConfigError, match="lam"):
        prox_nm_group(z, -1.0)


def test_solver_gives_exact_2_4_and_beats_magnitude_on_correlated_inputs(prox_path):
    w, x = _correlated(32, 64, 256, seed=2)
    stats = LayerStats.from_inputs(x)
    before = w.clone()
    res = proximal_nm_prune(w, stats, SPEC24)
    assert torch.equal(w, before)
    assert (res.mask.reshape(32, -1, 4).sum(-1) == 2).all()
    assert ((res.weight != 0).reshape(32, -1, 4).sum(-1) <= 2).all()
    assert (res.weight[~res.mask] == 0).all()
    err = res.info["error"]
    mag = magnitude_prune(w, stats, SPEC24).info["error"]
    assert err < 0.7 * mag
    assert err < 0.7 * wanda_prune(w, stats, SPEC24).info["error"]
    for key in ("steps", "strength", "projected_groups", "rel_error"):
        assert key in res.info
    # too few steps to reach 2:4 by the prox alone: the rest is projected, still exact
    short = proximal_nm_prune(w, stats, SPEC24, steps=4, refine_steps=3)
    assert short.info["projected_groups"] > 0
    assert (short.mask.reshape(32, -1, 4).sum(-1) == 2).all() and (short.weight[~short.mask] == 0).all()
    again = proximal_nm_prune(w, stats, SPEC24, steps=4, refine_steps=3)
    assert torch.equal(again.weight, short.weight) and torch.equal(again.mask, short.mask)


@pytest.mark.parametrize("pattern,sparsity", [(None, 0.5), ("4:8", None), ("1:4", None)])
def test_other_patterns_are_refused(pattern, sparsity):
    w, x = _correlated(8, 16, 64)
    with pytest.raises(ConfigError, match="2:4"):
        proximal_nm_prune(w, LayerStats.from_inputs(x), SparsitySpec.parse(sparsity, pattern))


def _row_losses(w0: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    d = (w0 - w).double()
    return torch.einsum("oi,ij,oj->o", d, h, d)


def test_masked_gd_never_increases_the_loss_and_keeps_the_mask():
    w, x = _correlated(12, 32, 128, seed=5)
    w = w.double()
    stats = LayerStats.from_inputs(x.double())
    h = stats.hessian(F64)
    start = magnitude_prune(w, stats, SparsitySpec(0.6))
    losses = [_row_losses(w, start.weight, h)]
    for k in (1, 2, 5, 20, 100):
        out = masked_gd_refine(w, start.weight, start.mask, stats, steps=k)
        assert (out[~start.mask] == 0).all()
        losses.append(_row_losses(w, out, h))
    for a, b in zip(losses, losses[1:]):
        assert (b <= a * (1 + 1e-12)).all()
    assert losses[-1].sum() < 0.8 * losses[0].sum()
    # a fixed step of 1/λ_max(H) is monotone too; a larger one is refused
    lmax = float(torch.linalg.eigvalsh(h)[-1])
    fixed = masked_gd_refine(w, start.weight, start.mask, stats, steps=30, lr=1.0 / lmax)
    assert (_row_losses(w, fixed, h) <= losses[0] * (1 + 1e-12)).all()
    with pytest.raises(ConfigError, match="lr"):
        masked_gd_refine(w, start.weight, start.mask, stats, steps=3, lr=3.0 / lmax)
    # inputs untouched; weights off the mask are ignored
    noisy = start.weight + (~start.mask) * 5.0
    assert torch.equal(masked_gd_refine(w, noisy, start.mask, stats, steps=3),
                       masked_gd_refine(w, start.weight, start.mask, stats, steps=3))
    assert torch.equal(masked_gd_refine(w, start.weight, start.mask, stats, steps=0), start.weight)


def test_masked_gd_errors():
    w, x = _correlated(4, 8, 32)
    mask = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(SolverError, match="Hessian"):
        masked_gd_refine(w, w, mask, LayerStats.from_inputs(x, with_hessian=False), steps=2)
    with pytest.raises(SolverError, match="boolean"):
        masked_gd_refine(w, w, mask.float(), LayerStats.from_inputs(x), steps=2)
    with pytest.raises(SolverError, match="shape"):
        masked_gd_refine(w, w[:2], mask, LayerStats.from_inputs(x), steps=2)
    with pytest.raises(ConfigError, match="steps"):
        masked_gd_refine(w, w, mask, LayerStats.from_inputs(x), steps=-1)


def test_preconditioning_follows_the_input_scales():
    """Inputs whose columns differ in scale (as language-model activations do): in the
    preconditioned variables the steps and the regulariser see each input's norm, which
    must give a clearly better 2:4 mask than running on W, and beat SparseGPT's."""
    g = torch.Generator().manual_seed(0)
    cols = 128
    z = torch.randn(512, cols, generator=g, dtype=F64)
    a = torch.randn(cols, cols, generator=g, dtype=F64) / math.sqrt(cols)
    scales = torch.exp(torch.randn(cols, generator=g, dtype=F64))
    x = ((z @ a) * scales).float()
    w = torch.randn(64, cols, generator=g)
    stats = LayerStats.from_inputs(x)
    pre = proximal_nm_prune(w, stats, SPEC24)
    plain = proximal_nm_prune(w, stats, SPEC24, precondition=False)
    for res in (pre, plain):
        assert (res.mask.reshape(64, -1, 4).sum(-1) == 2).all() and (res.weight[~res.mask] == 0).all()
    assert pre.info["error"] < 0.6 * plain.info["error"]
    assert pre.info["error"] < get_solver("sparsegpt").fn(w, stats, SPEC24).info["error"]
    with pytest.raises(ConfigError, match="damp"):
        proximal_nm_prune(w, stats, SPEC24, damp=-1.0)
    with pytest.raises(ConfigError, match="precondition"):
        proximal_nm_prune(w, stats, SPEC24, precondition="yes")


def test_refit_choices_on_the_final_mask():
    """The default PCG refit reaches the least-squares optimum on the mask, so it is at
    least as good as masked gradient steps from the same point; both keep the mask."""
    w, x = _correlated(24, 64, 256, seed=12)
    stats = LayerStats.from_inputs(x)
    pcg = proximal_nm_prune(w, stats, SPEC24)
    gd = proximal_nm_prune(w, stats, SPEC24, refine="gd")
    none = proximal_nm_prune(w, stats, SPEC24, refine_steps=0)
    assert torch.equal(pcg.mask, gd.mask) and torch.equal(pcg.mask, none.mask)
    for res in (pcg, gd, none):
        assert (res.weight[~res.mask] == 0).all()
    assert pcg.info["error"] <= gd.info["error"] * (1 + 1e-6) <= none.info["error"] * (1 + 1e-6)
    assert 0 < pcg.info["refine_steps"] <= 50 and gd.info["refine_steps"] == 50 and none.info["refine_steps"] == 0
    with pytest.raises(ConfigError, match="refine"):
        proximal_nm_prune(w, stats, SPEC24, refine="lbfgs")
