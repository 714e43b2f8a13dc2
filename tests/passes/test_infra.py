"""PassManager: refuses wrong orders, lints, and catches passes that change logits while claiming not to."""
from __future__ import annotations

import pytest
import torch

from graphprune.errors import PassOrderError, VerificationError
from graphprune.graph.model import GraphModel
from graphprune.passes.infra import Pass, PassContext, PassManager, PassResult, Prop
from graphprune.passes.observe import InsertObserversPass, RemoveObserversPass
from graphprune.passes.prune import PruneConfig, SequentialPrunePass
from graphprune.solvers import SparsitySpec


class NeedsFolded(Pass):
    requires = frozenset({Prop.NORMS_FOLDED})

    def run(self, gm, ctx):
        return PassResult(gm, False)


class SneakyScale(Pass):
    """Claims to preserve function but scales one weight."""

    preserves_function = True

    def run(self, gm, ctx):
        li = gm.block_linears()[0]
        gm.set_weight(li.weight, gm.get_attr(li.weight) * 1.5)
        return PassResult(gm, True)


class Honest(Pass):
    """Really preserves function: scales a Linear's output and its consumer back (here: no-op rewrite)."""

    preserves_function = True

    def run(self, gm, ctx):
        li = gm.block_linears()[0]
        w = gm.get_attr(li.weight).clone()
        gm.set_weight(li.weight, w)
        return PassResult(gm, False)


class ReturnsNone(Pass):
    def run(self, gm, ctx):
        return None


def test_wrong_order_is_refused_before_running(tiny_gm) -> None:
    gm = tiny_gm
    with pytest.raises(PassOrderError, match="NeedsFolded requires.*graph.norms_folded.*passes before it: none"):
        PassManager([NeedsFolded()]).run(gm)
    prune = SequentialPrunePass(PruneConfig("magnitude", SparsitySpec(0.5)))
    with pytest.raises(PassOrderError, match="sequential_prune requires.*observers"):
        PassManager([prune]).run(gm)
    # after removing observers, pruning again is refused too
    with pytest.raises(PassOrderError, match="passes before it: insert_observers, remove_observers"):
        PassManager([InsertObserversPass(), RemoveObserversPass(), prune]).check_order()


def test_detects_a_pass_that_changes_logits(tiny_gm) -> None:
    gm = tiny_gm
    with pytest.raises(VerificationError, match="SneakyScale claims to preserve function but changed the logits"):
        PassManager([Honest(), SneakyScale()], PassContext(progress=False)).run(gm)


def test_honest_passes_and_observers_preserve_logits(tiny_gm, tokens) -> None:
    gm = tiny_gm
    before = gm(tokens)
    pm = PassManager([Honest(), InsertObserversPass(), RemoveObserversPass()], PassContext(progress=False))
    gm = pm.run(gm)
    assert torch.equal(gm(tokens), before)
    assert [r["pass"] for r in pm.report()] == ["Honest", "insert_observers", "remove_observers"]
    assert Prop.OBSERVERS not in gm.props


def test_observers_share_inputs(tiny_gm) -> None:
    gm = tiny_gm
    res = InsertObserversPass().run(gm, PassContext())
    assert res.stats["observers"] == 2 * 4  # qkv, o, gate/up (fc1), down (fc2) per block
    names = {li.name.rsplit(".", 1)[1]: gm.meta["observers"][li.name] for li in gm.blocks[0].linears}
    assert names["q_proj"] == names["k_proj"] == names["v_proj"]
    assert len(set(names.values())) == 4


def test_non_result_is_an_error(tiny_gm) -> None:
    with pytest.raises(VerificationError, match="returned NoneType"):
        PassManager([ReturnsNone()]).run(tiny_gm)
