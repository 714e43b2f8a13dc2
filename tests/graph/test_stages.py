"""Stage-by-stage execution: the observe-only calibration forward against the full one."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from graphprune.graph.stages import StagedGraph, StageRunner
from graphprune.models.tiny import random_tokens
from graphprune.passes.infra import PassContext, PassManager
from graphprune.passes.observe import InsertObserversPass, observer_for


def _mm_macs(counter: FlopCounterMode) -> float:
    return sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op).split(".")[1] in ("mm", "addmm")) / 2


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def test_observe_only_forward_gives_the_same_statistics_and_skips_what_no_observer_reads(tiny_gm) -> None:
    """An observe-only forward accumulates exactly the statistics of a full forward, computes
    no Linear downstream of the block's last observer (the matmul count drops by the down
    projections) and leaves the stage's outputs to the plain forward that follows."""
    gm = PassManager([InsertObserversPass(hessian=True)], PassContext(progress=False)).run(tiny_gm)
    calib = random_tokens(4, 24, seed=3)
    tokens = calib.numel()
    reference = _logits(gm(calib))
    seen: list[int] = []

    def stage(stage, forward) -> None:
        block = gm.blocks[stage.block]
        obs = {observer_for(gm, li.name) for li in block.linears}
        runs = {}
        for observe_only in (True, False):
            for o in obs:
                o.reset()
                o.enabled = True
            with FlopCounterMode(display=False) as counter:
                outs = forward(observe_only=observe_only)
            for o in obs:
                o.enabled = False
            runs[observe_only] = (_mm_macs(counter), {o.name: o.stats() for o in obs}, outs)
        (skim_macs, skim_stats, skim_outs), (full_macs, full_stats, full_outs) = runs[True], runs[False]
        assert skim_outs == [] and len(full_outs) == 2  # two micro-batches
        for name, st in full_stats.items():
            assert skim_stats[name].count == st.count == tokens
            assert torch.equal(skim_stats[name].xtx, st.xtx)
            assert torch.equal(skim_stats[name].col_sq, st.col_sq)
        down = block.linears[-1]
        assert skim_macs == pytest.approx(full_macs - tokens * down.in_features * down.out_features, rel=1e-9)
        seen.append(stage.block)

    staged = StagedGraph(gm)
    outs = StageRunner(staged, list(calib.split(2))).run(stage, stop_before_epilogue=False)
    assert seen == list(range(len(gm.blocks)))
    assert outs is not None
    torch.testing.assert_close(torch.cat([_logits(o) for o in outs]), reference, rtol=1e-5, atol=1e-5)


def test_a_stage_callback_that_only_observes_is_refused(tiny_gm) -> None:
    """The stage's outputs come from a plain forward; a callback that never runs one is an error."""
    gm = PassManager([InsertObserversPass(hessian=False)], PassContext(progress=False)).run(tiny_gm)
    with pytest.raises(RuntimeError, match="did not run the stage"):
        StageRunner(StagedGraph(gm), [random_tokens(2, 16, seed=1)]).run(lambda stage, forward: forward(observe_only=True))


def _run_recording_block_inputs(gm, calib: torch.Tensor, last: bool) -> tuple[list, list[bool], list[bool]]:
    """Run every stage with ``forward(last=last)``; for each micro-batch after the first, whether
    the hidden state block 0 was fed for the previous one was still alive when it started."""
    width = gm.model.config.hidden_size
    staged = StagedGraph(gm)
    fed: list[weakref.ref] = []
    alive_at_next: list[bool] = []
    refused: list[bool] = []

    def record(module, args) -> None:
        hidden = next(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 3 and a.shape[-1] == width)
        if fed:
            alive_at_next.append(fed[-1]() is not None)
        fed.append(weakref.ref(hidden))

    def stage(stage, forward) -> None:
        forward(last=last)
        if last and stage.block == 0:
            with pytest.raises(RuntimeError, match="ran again after its last forward"):
                forward()
            refused.append(True)

    handle = staged.block_stages[0].module.register_forward_pre_hook(record)
    try:
        outs = StageRunner(staged, list(calib.split(2))).run(stage, stop_before_epilogue=False)
    finally:
        handle.remove()
    assert outs is not None
    return outs, alive_at_next, refused


def test_the_last_forward_drops_each_batchs_inputs_as_it_goes(tiny_gm) -> None:
    """``forward(last=True)`` gives the outputs of a plain forward, and when a block stage
    starts its micro-batch i+1, the hidden state it was fed for batch i is already gone (a
    plain forward keeps every batch's input until the stage is done); the stage cannot run
    again after its last forward."""
    calib = random_tokens(6, 16, seed=4)
    reference = _logits(tiny_gm(calib))
    for last in (True, False):
        outs, alive_at_next, refused = _run_recording_block_inputs(tiny_gm, calib, last)
        torch.testing.assert_close(torch.cat([_logits(o) for o in outs]), reference, rtol=1e-5, atol=1e-5)
        assert alive_at_next == ([False, False] if last else [True, True])  # three micro-batches
        assert refused == ([True] if last else [])
