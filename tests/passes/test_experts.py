"""MoE experts kept as batched 3-D weights (transformers 5): each expert pruned as a Linear of
its own, from the statistics of the tokens routed to it.

Checked against the eager model's own routing: an expert's ``XᵀX`` is the Gram matrix of the
hidden states the router sends it (and, for ``down_proj``, of the expert's own gated
activations); an expert no calibration token reaches is pruned by magnitude and says so;
experts left alone by a rule are listed one by one and counted in the achieved sparsity.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from graphprune.graph.model import GraphModel
from graphprune.models.tiny import random_tokens
from graphprune.models.zoo import zoo_model
from graphprune.passes.infra import PassContext, PassManager
from graphprune.passes.observe import ExpertInputObserver, InsertObserversPass, RemoveObserversPass
from graphprune.passes.prune import LayerRule, PruneConfig, SequentialPrunePass
from graphprune.solvers import SparsitySpec
from graphprune.solvers.base import LayerStats
from graphprune.solvers.magnitude import magnitude_prune


def _routing(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's expert input and its top-k expert indices, as the eager model computes them."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: tuple[Any, ...]) -> None:
        seen["x"], seen["index"] = args[0].detach().clone(), args[1].detach().clone()

    handle = model.model.layers[0].mlp.experts.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        handle.remove()
    return seen["x"], seen["index"]


def _prune(model: Any, tokens: torch.Tensor, method: str = "sparsegpt", rules: list[LayerRule] | None = None) -> GraphModel:
    gm = GraphModel.capture(model, name="tiny-mixtral")
    config = PruneConfig(method, SparsitySpec(0.5), rules=rules or [], batch_size=2, keep_stats=True)
    ctx = PassContext(progress=False, calibration=tokens)
    return PassManager([InsertObserversPass(), SequentialPrunePass(config), RemoveObserversPass()], ctx).run(gm)


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it() -> None:
    model = zoo_model("mixtral")
    tokens = random_tokens(4, 16, seed=3)
    x, index = _routing(model, tokens)
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    gm = _prune(model, tokens)
    experts = [e for e in gm.experts if e.block == 0]
    assert len(experts) == 8  # gate_up_proj and down_proj of 4 experts
    for e in experts:
        rows = x[(index == e.index).any(-1)]  # a token reaches an expert at most once
        if e.name.endswith("down_proj"):
            gate, up = (rows @ gate_up[e.index].T).chunk(2, dim=-1)
            rows = F.silu(gate) * up
        stats = gm.state.stats[e.name]
        assert stats.count == rows.shape[0] > 0
        assert torch.allclose(stats.xtx, (rows.T @ rows).double(), rtol=1e-4, atol=1e-4), e.name
        assert torch.allclose(stats.col_sq, rows.pow(2).sum(0).double(), rtol=1e-4, atol=1e-4)
    # the four experts' row counts add up to every token's top-2 choices
    assert sum(gm.state.stats[e.name].count for e in experts if e.name.endswith("down_proj")) == tokens.numel() * 2
    entries = {entry["name"]: entry for entry in gm.state.prune_report["layers"]}
    for e in gm.experts:
        w = gm.matrix(e)
        assert entries[e.name]["shape"] == [e.out_features, e.in_features] == list(w.shape)
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_an_expert_no_token_reaches_is_pruned_by_magnitude_and_reported() -> None:
    model = zoo_model("mixtral")
    for seed in range(50):  # a calibration this short leaves some expert of block 0 without tokens
        tokens = random_tokens(1, 3, seed=seed)
        _, index = _routing(model, tokens)
        idle = sorted(set(range(4)) - set(index.flatten().tolist()))
        if idle:
            break
    assert idle, "no calibration among 50 seeds leaves an expert idle"
    expert = idle[0]
    before = model.model.layers[0].mlp.experts.down_proj[expert].detach().clone()
    gm = _prune(model, tokens)
    name = f"model.layers.0.mlp.experts.{expert}.down_proj"
    entry = next(e for e in gm.state.prune_report["layers"] if e["name"] == name)
    assert "no calibration token" in entry["note"] and "magnitude" in entry["note"]
    assert name not in gm.state.stats
    want = magnitude_prune(before, LayerStats(torch.zeros(before.shape[1], dtype=torch.float64), 0), SparsitySpec(0.5)).weight
    info = next(e for e in gm.experts if e.name == name)
    assert torch.equal(gm.matrix(info), want)
    # the experts that did see tokens were solved with them: no note
    routed = [e for e in gm.state.prune_report["layers"] if ".experts." in e["name"] and e["name"] in gm.state.stats]
    assert routed and all("note" not in e for e in routed)


def test_experts_left_alone_by_a_rule_are_listed_and_counted() -> None:
    model = zoo_model("mixtral")
    gm = _prune(model, random_tokens(4, 16, seed=3), method="wanda", rules=[LayerRule("*.experts.3.*", None)])
    report = gm.state.prune_report
    skipped = {e["name"]: e for e in report["not_pruned"]}
    left = {f"model.layers.{b}.mlp.experts.3.{p}" for b in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert left <= set(skipped)
    assert all("excluded" in skipped[n]["reason"] for n in left)
    for e in gm.experts:
        zeros = int((gm.matrix(e) == 0).sum())
        assert (zeros == 0) if e.index == 3 else (zeros == e.out_features * e.in_features // 2), e.name
    matrices = gm.block_matrices()
    zeros = sum(int((w == 0).sum()) for w in matrices.values())
    total = sum(w.numel() for w in matrices.values())
    assert report["achieved_sparsity"] == pytest.approx(zeros / total, abs=1e-6)


def test_expert_observer_splits_rows_by_offsets() -> None:
    torch.manual_seed(0)
    x = torch.randn(11, 6)
    offsets = torch.tensor([4.0, 4.0, 9.0, 11.0])  # expert 1 gets no row
    obs = ExpertInputObserver("e", 6, 4, hessian=True)
    obs.reset()
    obs.enabled = True
    assert obs(x, offsets) is x
    assert obs.count == 11 and obs.counts.tolist() == [4, 0, 5, 2]
    assert obs.stats(1) is None
    for e, (a, b) in enumerate([(0, 4), (4, 4), (4, 9), (9, 11)]):
        if a == b:
            continue
        st = obs.stats(e)
        assert st is not None and st.count == b - a
        assert torch.allclose(st.xtx, (x[a:b].T @ x[a:b]).double(), atol=1e-5)
        assert torch.allclose(st.col_sum, x[a:b].sum(0).double(), atol=1e-5)
