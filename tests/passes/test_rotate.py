"""RotatePass: every rotation leaves the logits unchanged; pruning then runs in the rotated space."""
from __future__ import annotations

import pytest
import torch

from graphprune.errors import ConfigError, PassOrderError
from graphprune.graph.edit import export_blockers
from graphprune.graph.model import GraphModel
from graphprune.graph.stream import find_stream
from graphprune.models.tiny import random_tokens
from graphprune.passes.fold_norms import FoldNormsPass
from graphprune.passes.infra import PassContext, PassManager, Prop, relative_diff
from graphprune.passes.observe import InsertObserversPass, RemoveObserversPass
from graphprune.passes.prune import PruneConfig, SequentialPrunePass
from graphprune.passes.rotate import LearnConfig, RotatePass
from graphprune.solvers import SparsitySpec
from graphprune.solvers.rotation import random_orthogonal


def _ctx() -> PassContext:
    return PassContext(progress=False, calibration=random_tokens(6, 32, seed=3))


def _rotate(gm: GraphModel, source: str, **kw) -> tuple[GraphModel, PassManager]:
    pm = PassManager([FoldNormsPass(), RotatePass(source, **kw)], _ctx())
    return pm.run(gm), pm


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the learned rotation runs many tiny products
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("source", ["hadamard", "pca", "learned"])
def test_every_rotation_preserves_logits(tiny_gm: GraphModel, tiny_name: str, tokens: torch.Tensor, source: str, one_thread) -> None:
    before = tiny_gm(tokens)
    weights_before = {li.name: tiny_gm.get_attr(li.weight).clone() for li in tiny_gm.block_linears()}
    learn = LearnConfig(SparsitySpec(0.5), init="identity", steps=6, lr=0.1, blocks_per_step=2) if source == "learned" else None
    gm, _ = _rotate(tiny_gm, source, learn=learn)
    assert {Prop.NORMS_FOLDED, Prop.ROTATED} <= gm.props
    assert relative_diff(gm(tokens), before) <= 1e-4
    info = gm.state.rotation
    assert info["source"] == source and info["orthonormality_error"] < 1e-5
    # the weights really changed (a rotation, not a no-op)
    moved = [float((gm.get_attr(li.weight) - weights_before[li.name]).abs().max()) for li in gm.block_linears()]
    assert min(moved) > 1e-3
    if source == "learned":  # Cayley SGD lowered the pruned model's layer-wise error
        assert info["objective_final"] < info["objective_initial"] and not info["kept_initial"]
    if source != "hadamard":
        imp = info["importance"]
        assert torch.all(imp[:-1] >= imp[1:])  # ordered by energy: ready for slicing
    if tiny_name == "tiny-llama":  # still a standard Hugging Face model computing the same logits
        with torch.no_grad():
            hf = gm.model(input_ids=tokens, use_cache=False).logits
        assert relative_diff(hf, before) <= 1e-4 and not export_blockers(gm)
    else:  # a rotated LayerNorm stream is graph-only, and says so
        assert any("LayerNorm" in b for b in export_blockers(gm))


def test_a_given_rotation_is_absorbed_exactly(tiny_gm: GraphModel, tiny_name: str, tokens: torch.Tensor) -> None:
    q = random_orthogonal(64, torch.Generator().manual_seed(5))
    if tiny_name != "tiny-llama":
        pytest.skip("OPT's tables are centred by folding; the LLaMA case checks the algebra")
    table = find_stream(tiny_gm).embeddings[0][1]
    emb_before = tiny_gm.get_attr(table).detach().double().clone()
    head_before = tiny_gm.get_attr(tiny_gm.lm_head.weight).detach().double().clone() * tiny_gm.model.model.norm.weight.detach().double()
    gm, _ = _rotate(tiny_gm, "given", rotation=q)
    stream = find_stream(gm)
    # folding leaves LLaMA's token table alone and unties the head: E -> EQ, head·diag(g) -> head·diag(g)·Q
    torch.testing.assert_close(gm.get_attr(stream.embeddings[0][1]).detach().double(), emb_before @ q, rtol=0, atol=1e-5)
    torch.testing.assert_close(gm.get_attr(stream.lm_head.weight).detach().double(), head_before @ q, rtol=0, atol=1e-5)
    assert gm.state.rotation["source"] == "given"


def test_rotation_needs_folded_norms(tiny_gm: GraphModel) -> None:
    with pytest.raises(PassOrderError, match="graph.norms_folded"):
        PassManager([RotatePass("hadamard")], _ctx()).run(tiny_gm)
    with pytest.raises(ConfigError, match="unknown rotation"):
        RotatePass("svd")
    with pytest.raises(ConfigError, match="LearnConfig"):
        RotatePass("learned")


def test_any_solver_runs_in_the_rotated_space(tiny_gm: GraphModel, tiny_name: str) -> None:
    method = "wanda" if tiny_name == "tiny-llama" else "sparsegpt"
    spec = SparsitySpec(0.5)
    passes = [
        FoldNormsPass(),
        RotatePass("hadamard"),
        InsertObserversPass(),
        SequentialPrunePass(PruneConfig(method, spec, batch_size=3)),
        RemoveObserversPass(),
    ]
    gm = PassManager(passes, _ctx()).run(tiny_gm)
    assert {Prop.ROTATED, Prop.PRUNED} <= gm.props
    rep = gm.state.prune_report
    assert abs(rep["achieved_sparsity"] - 0.5) < 0.01
    for li in gm.block_linears():  # the rotated weights themselves are sparse
        w = gm.get_attr(li.weight)
        assert float((w == 0).float().mean()) >= 0.49
    assert torch.isfinite(gm(random_tokens(1, 16))).all()


def test_learned_rotation_objective_follows_the_method(tiny_gm: GraphModel, tokens: torch.Tensor, one_thread) -> None:
    """Hessian solvers get the OBS-saliency objective, mask-only methods the masked error; every method starts from the identity."""
    assert (LearnConfig(SparsitySpec(0.5), "wanda").score, LearnConfig(SparsitySpec(0.5), "wanda").start) == ("wanda", "identity")
    assert LearnConfig(SparsitySpec(0.5), "wanda", init="pca").start == "pca"
    assert (LearnConfig(SparsitySpec(0.5), "magnitude").score, LearnConfig(SparsitySpec(0.5), "gblm").score) == ("magnitude", "wanda")
    for method in ("sparsegpt", "alps", "proximal"):
        assert (LearnConfig(SparsitySpec(0.5), method).score, LearnConfig(SparsitySpec(0.5), method).start) == ("obs", "identity")
    assert LearnConfig(SparsitySpec(0.5), "sparsegpt", init="pca").start == "pca"  # an explicit init wins
    before = tiny_gm(tokens)
    gm, _ = _rotate(tiny_gm, "learned", learn=LearnConfig(SparsitySpec(0.5), "sparsegpt", steps=6, lr=0.1, blocks_per_step=2))
    info = gm.state.rotation
    assert (info["mask_score"], info["init"]) == ("obs", "identity")
    assert info["objective_final"] <= info["objective_initial"] and info["orthonormality_error"] < 1e-5
    assert relative_diff(gm(tokens), before) <= 1e-4


def test_job_settings_are_validated_before_loading() -> None:
    from graphprune.pipeline import PruneJob

    assert PruneJob(slicing=0.25).rotation_source() == "pca"  # slicing implies PCA
    assert not PruneJob(slicing=0.25).prunes() and PruneJob(rotation="hadamard", sparsity=0.5).prunes()
    with pytest.raises(ConfigError, match="unknown rotation"):
        PruneJob(rotation="svd", sparsity=0.5).rotation_source()
    with pytest.raises(ConfigError, match="slicing fraction"):
        PruneJob(slicing=1.5).rotation_source()
    cfg = LearnConfig.from_options(SparsitySpec(0.5), "wanda", {"steps": 3, "lr": 0.2, "init": "identity"})
    assert (cfg.steps, cfg.lr, cfg.init) == (3, 0.2, "identity")
    with pytest.raises(ConfigError, match="unknown learned-rotation options"):
        LearnConfig.from_options(SparsitySpec(0.5), "wanda", {"step": 3})


def test_learned_rotation_holds_out_calibration_sequences(tiny_gm: GraphModel, tokens: torch.Tensor, one_thread) -> None:
    """The last quarter of the calibration sequences never enters a step: their statistics
    measure the held-out objective, which picks the rotation; holdout=0 turns that off."""
    cfg = LearnConfig(SparsitySpec(0.5), "wanda", steps=6, lr=0.1, blocks_per_step=2, check_every=2)
    calib = _ctx().calibration
    assert calib is not None
    fit, held = cfg.split(calib)
    n_held = round(0.25 * calib.shape[0])
    assert held is not None and torch.equal(held, calib[-n_held:]) and torch.equal(fit, calib[:-n_held])
    before = tiny_gm(tokens)
    gm, _ = _rotate(tiny_gm, "learned", learn=cfg)
    info = gm.state.rotation
    checks = dict(info["heldout_objective"])
    assert sorted(checks)[0] == 0 and set(checks) <= {0, 2, 4, 6}
    assert checks[info["best_step"]] == min(checks.values())
    assert info["heldout_tokens"] == n_held * calib.shape[1]
    assert info["calibration_tokens"] == calib.numel()
    assert relative_diff(gm(tokens), before) <= 1e-4
    off = LearnConfig.from_options(SparsitySpec(0.5), "wanda", {"holdout": 0})
    assert off.split(calib) == (calib, None)
    with pytest.raises(ConfigError, match="holdout=0"):
        cfg.split(calib[:1])
    with pytest.raises(ConfigError, match="fraction in"):
        LearnConfig.from_options(SparsitySpec(0.5), "wanda", {"holdout": 1.0})
