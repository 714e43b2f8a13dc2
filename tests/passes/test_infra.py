"""PassManager: refuses wrong orders, lints, and catches passes that change logits while claiming not to."""
from __future__ import annotations

import pytest
import torch

from graphprune.errors import PassOrderError, SolverError, VerificationError
from graphprune.passes.infra import Instrument, Pass, PassContext, PassManager, PassResult, Prop, Sequential
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


class SneakyRewire(Pass):
    """Claims to preserve function, but inserts an observer (a new node and module) and scales
    every block weight before the check catches it: the most a pass can leave half-changed."""

    preserves_function = True

    def run(self, gm, ctx):
        InsertObserversPass().run(gm, ctx)
        for li in gm.block_linears():
            gm.set_weight(li.weight, gm.get_attr(li.weight) * 2.0)
        return PassResult(gm, True)


def test_a_failing_pass_leaves_the_callers_graph_as_it_was(tiny_gm, tokens) -> None:
    gm = tiny_gm
    model = gm.model  # what callers (the exporters) hold
    logits = gm(tokens)
    eager = model(input_ids=tokens, use_cache=False).logits.detach()
    nodes = len(gm.gm.graph.nodes)
    props = set(gm.props)
    with pytest.raises(VerificationError, match="SneakyRewire .* restored"):
        PassManager([SneakyRewire()], PassContext(progress=False)).run(gm)
    assert torch.equal(gm(tokens), logits)
    assert torch.equal(model(input_ids=tokens, use_cache=False).logits, eager)  # the very model object is restored
    assert len(gm.gm.graph.nodes) == nodes and not gm.state.observers and gm.props == props
    assert gm.model is model
    # graph and model still share every weight: a write through the graph reaches the model
    li = gm.block_linears()[0]
    gm.set_weight(li.weight, torch.zeros_like(gm.get_attr(li.weight)))
    assert not model.get_submodule(li.name).weight.any()


class FailsMidway(Pass):
    """An in-place pass that is not function-preserving and raises after writing a weight."""

    def run(self, gm, ctx):
        li = gm.block_linears()[0]
        gm.set_weight(li.weight, torch.zeros_like(gm.get_attr(li.weight)))
        raise SolverError("boom")


def test_rollback_policy(tiny_gm, tokens) -> None:
    gm = tiny_gm
    logits = gm(tokens)
    with pytest.raises(SolverError):
        PassManager([FailsMidway()], PassContext(progress=False, rollback="all")).run(gm)
    assert torch.equal(gm(tokens), logits)  # "all": every in-place pass is snapshotted
    with pytest.raises(SolverError):
        PassManager([FailsMidway()], PassContext(progress=False)).run(gm)
    assert not torch.equal(gm(tokens), logits)  # default: only verified passes are (no model copy per prune)


class Recorder(Instrument):
    def __init__(self):
        self.calls = []

    def before_pass(self, p, gm, ctx):
        self.calls.append(("before", p.name))

    def after_pass(self, p, result, ctx):
        self.calls.append(("after", p.name))
        return {"recorded": True}

    def on_failure(self, p, exc, ctx):
        self.calls.append(("failed", p.name))


def test_sequential_composes_and_instruments_see_every_pass(tiny_gm) -> None:
    rec = Recorder()
    seq = Sequential([InsertObserversPass(), NeedsObserversMarker(), RemoveObserversPass()], name="observe")
    assert seq.requires == frozenset()  # the marker's requirement is met inside
    assert seq.establishes == {"test.marked"} and seq.invalidates == {Prop.OBSERVERS}
    assert seq.preserves_function
    pm = PassManager([seq], PassContext(progress=False, instruments=[rec]))
    gm = pm.run(tiny_gm)
    assert rec.calls == [
        ("before", "observe"),
        ("before", "insert_observers"), ("after", "insert_observers"),
        ("before", "NeedsObserversMarker"), ("after", "NeedsObserversMarker"),
        ("before", "remove_observers"), ("after", "remove_observers"),
        ("after", "observe"),
    ]
    (entry,) = pm.report()
    assert entry["pass"] == "observe" and entry["recorded"] and entry["seconds"] >= 0 and "peak_rss_mb" in entry
    assert [e["pass"] for e in entry["passes"]] == ["insert_observers", "NeedsObserversMarker", "remove_observers"]
    assert "test.marked" in gm.props and Prop.OBSERVERS not in gm.props
    with pytest.raises(PassOrderError, match=r"pass lonely requires \['graph.observers_inserted'\]"):
        PassManager([Sequential([NeedsObserversMarker()], name="lonely")]).run(tiny_gm)


class Writes(Pass):
    """In place, not function-preserving: scales the first block Linear (no failure)."""

    def run(self, gm, ctx):
        li = gm.block_linears()[0]
        gm.set_weight(li.weight, gm.get_attr(li.weight) * 3.0)
        return PassResult(gm, True)


def test_nested_members_share_the_outer_instruments_and_snapshot(tiny_gm, tokens, caplog, monkeypatch) -> None:
    gm = tiny_gm
    logits = gm(tokens)
    snapshots: list[int] = []
    take = type(gm).snapshot

    def counting(self, weights=True):
        snapshots.append(1)
        return take(self, weights)

    monkeypatch.setattr(type(gm), "snapshot", counting)
    inner = Sequential([Writes(), FailsMidway()], name="inner")
    with caplog.at_level("INFO", logger="graphprune.passes.infra"), pytest.raises(SolverError):
        PassManager([Sequential([inner], name="outer")], PassContext(progress=True, rollback="all")).run(gm)
    # one snapshot (the outermost) covers both members: the first member's write is undone too
    assert len(snapshots) == 1
    assert torch.equal(gm(tokens), logits)
    # one Progress instrument across the levels: members are indented under their Sequential
    lines = [r.getMessage() for r in caplog.records if "pass " in r.getMessage()]
    assert lines[:3] == [f"pass outer on {gm.name}", f"  pass inner on {gm.name}", f"    pass Writes on {gm.name}"]
    assert "    pass FailsMidway failed: boom" in lines


class NeedsObserversMarker(Pass):
    requires = frozenset({Prop.OBSERVERS})
    establishes = frozenset({"test.marked"})
    preserves_function = True

    def run(self, gm, ctx):
        return PassResult(gm, False)


def test_failure_reaches_the_instruments(tiny_gm) -> None:
    rec = Recorder()
    with pytest.raises(VerificationError):
        PassManager([SneakyScale()], PassContext(progress=False, instruments=[rec])).run(tiny_gm)
    # the context's instruments wrap the built-in ones, so they hear of the failed verification
    assert rec.calls == [("before", "SneakyScale"), ("failed", "SneakyScale")]


class DropsALinear(Pass):
    """Rewires the first block Linear's node away (a structural change) and reports it."""

    def __init__(self, report: bool) -> None:
        self.report = report

    def run(self, gm, ctx):
        li = gm.block_linears()[0]
        li.node.replace_all_uses_with(li.node.args[0])  # a square Linear: shapes still fit
        gm.gm.graph.eliminate_dead_code()
        return PassResult(gm, self.report)


def test_manager_invalidates_caches_after_a_modifying_pass(tiny_gm) -> None:
    gm = tiny_gm
    before = len(gm.linears)  # cached
    first = gm.block_linears()[0]
    assert first.in_features == first.out_features  # q_proj is square in both tiny models
    PassManager([DropsALinear(report=True)], PassContext(progress=False, verify=False)).run(gm)
    assert len(gm.linears) == before - 1


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
    names = {li.name.rsplit(".", 1)[1]: gm.state.observers[li.name] for li in gm.blocks[0].linears}
    assert names["q_proj"] == names["k_proj"] == names["v_proj"]
    assert len(set(names.values())) == 4


def test_non_result_is_an_error(tiny_gm) -> None:
    with pytest.raises(VerificationError, match="returned NoneType"):
        PassManager([ReturnsNone()]).run(tiny_gm)


class GraphOnlyFails(Pass):
    """Declares it edits only the graph: inserts the observers, then fails."""

    preserves_function = True
    edits_weights = False

    def run(self, gm, ctx):
        InsertObserversPass().run(gm, ctx)
        raise SolverError("boom")


def test_a_graph_only_pass_is_rolled_back_without_a_copy_of_the_weights(tiny_gm, tokens, monkeypatch) -> None:
    gm = tiny_gm
    logits = gm(tokens)
    nodes = [n.name for n in gm.gm.graph.nodes]
    storage = {n: p.data_ptr() for n, p in gm.model.named_parameters()}
    taken: list[tuple[bool, object]] = []
    take = type(gm).snapshot

    def recording(self, weights=True):
        snap = take(self, weights)
        taken.append((weights, snap))
        return snap

    monkeypatch.setattr(type(gm), "snapshot", recording)
    PassManager([InsertObserversPass(), RemoveObserversPass()], PassContext(progress=False)).run(gm)
    assert [w for w, _ in taken] == [False, False]  # verified, so snapshotted, but the weights are shared
    taken.clear()
    with pytest.raises(SolverError, match="boom"):
        PassManager([GraphOnlyFails()], PassContext(progress=False)).run(gm)
    ((weights, snap),) = taken
    assert not weights and all(p.data_ptr() == storage[n] for n, p in snap.model.named_parameters())
    assert [n.name for n in gm.gm.graph.nodes] == nodes  # the observers the failed pass inserted are gone
    assert {n: p.data_ptr() for n, p in gm.model.named_parameters()} == storage
    assert torch.equal(gm(tokens), logits)


def test_memory_release_runs_the_collector_and_the_trim_only_for_what_is_worth_it(monkeypatch) -> None:
    """``release_free_memory`` collects cycles and trims the heap, ``trim_heap`` only trims; both
    do nothing when told less than RELEASE_MIN_BYTES was freed, and no size means always."""
    import graphprune.passes.infra as infra

    calls: list[str] = []
    monkeypatch.setattr(infra, "_malloc_trim", lambda: lambda pad: calls.append(f"trim {pad}"))
    monkeypatch.setattr(infra.gc, "collect", lambda: calls.append("collect"))
    small, big = infra.RELEASE_MIN_BYTES - 1, infra.RELEASE_MIN_BYTES
    infra.release_free_memory(small)
    infra.trim_heap(small)
    assert calls == []
    infra.trim_heap(big)
    assert calls == ["trim 0"]
    infra.release_free_memory(big)
    infra.release_free_memory()
    infra.trim_heap()
    assert calls == ["trim 0", "collect", "trim 0", "collect", "trim 0", "trim 0"]
