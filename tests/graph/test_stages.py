"""Stage-by-stage execution: the observe-only calibration forward against the full one."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
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


def test_a_bfloat16_compute_dtype_runs_the_block_linears_in_bfloat16_and_keeps_the_statistics_float32(tiny_gm) -> None:
    """``compute_dtype=bfloat16``: every block Linear computes in bfloat16 (its output dtype), the
    prologue does not, the observers' ``XᵀX`` is the float32 product of exactly what they saw
    (a bfloat16 product would be ~1e-3 off), and the logits move by bfloat16 rounding only."""
    gm = PassManager([InsertObserversPass(hessian=True)], PassContext(progress=False)).run(tiny_gm)
    calib = random_tokens(4, 24, seed=5)
    reference = _logits(gm(calib))
    seen_inputs: dict[str, list[torch.Tensor]] = {}
    block_linears = {li.name for b in gm.blocks for li in b.linears}
    shapes = {(li.in_features, li.out_features) for b in gm.blocks for li in b.linears}
    observers = {id(observer_for(gm, name)): observer_for(gm, name) for name in block_linears}
    assert 48 not in {i for i, _ in shapes}  # the products below are told apart by their [tokens, in] operand

    def record(module, args, output) -> None:
        if id(module) in observers and module.enabled:
            seen_inputs.setdefault(module.name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

    class LinearDtypes(TorchDispatchMode):
        """The output dtype of every product of a [tokens, in] activation with a block Linear's weight."""

        def __init__(self) -> None:
            super().__init__()
            self.dtypes: list[torch.dtype] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                a, b = args[-2], args[-1]
                if (a.shape[-1], b.shape[-1]) in shapes and b.shape[0] == a.shape[-1]:
                    self.dtypes.append(out.dtype)
            return out

    prologue_dtypes: set[torch.dtype] = set()
    staged = StagedGraph(gm)

    def prologue(module, args, output) -> None:  # embeddings, rotary tables, masks
        flat = output if isinstance(output, (tuple, list)) else [output]
        prologue_dtypes.update(t.dtype for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point())

    def stage(stage, forward) -> None:
        block_obs = [o for o in observers.values() if any(observer_for(gm, li.name) is o for li in gm.blocks[stage.block].linears)]
        for o in block_obs:
            o.reset()
            o.enabled = True
        forward(observe_only=True)
        for o in block_obs:
            o.enabled = False
            st = o.stats()
            x = torch.cat(seen_inputs.pop(o.name)).double()
            assert st.count == x.shape[0]
            torch.testing.assert_close(st.xtx, x.T @ x, rtol=1e-6, atol=1e-6 * float((x * x).sum(0).max()))
            torch.testing.assert_close(st.col_sq, (x * x).sum(0), rtol=1e-6, atol=0)
        forward(last=True)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    emb = staged.stages[0].module.register_forward_hook(prologue)
    try:
        with LinearDtypes() as products:
            outs = StageRunner(staged, list(calib.split(2)), compute_dtype=torch.bfloat16).run(stage, stop_before_epilogue=False)
    finally:
        hook.remove()
        emb.remove()
    assert outs is not None
    # per micro-batch: the statistics forward (all but the down projections) and the full propagation
    linears_per_block = len(gm.blocks[0].linears)
    assert len(products.dtypes) >= 2 * len(gm.blocks) * (2 * linears_per_block - 1), len(products.dtypes)
    assert set(products.dtypes) == {torch.bfloat16}
    assert prologue_dtypes == {torch.float32}
    logits = torch.cat([_logits(o) for o in outs])
    assert logits.dtype == torch.float32
    diff = float((logits - reference).abs().max() / reference.abs().max())
    assert 0 < diff < 0.05, diff  # rounded, but not broken
