"""Stage partitioning and stage-by-stage execution.

The captured graph is split (``torch.fx.passes.split_module``) into sequential stages:

* stage 0, the prologue: embedding, positions, masks, rotary tables;
* stages 1..B, one per decoder block, found by :func:`graphprune.graph.queries.find_blocks`;
* stage B+1, the epilogue: final norm and LM head.

:class:`StageRunner` executes the split graph one stage at a time over a list of
micro-batches, keeping only the values that later stages still read. A callback sees each
block stage before and after it runs, which is what sequential calibration needs: stage i
is fed the outputs of the already-pruned stage i-1 and is pruned before stage i+1 runs.
"""
from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor
from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module

from graphprune.graph import queries as q
from graphprune.graph.model import GraphModel

log = logging.getLogger(__name__)


def stage_assignment(gm: GraphModule) -> dict[Node, int]:
    """Stage index of every node: 0 prologue, 1..B blocks, B+1 epilogue."""
    blocks = {p: i for i, p in enumerate(q.find_blocks(gm))}
    last = len(blocks)
    part: dict[Node, int] = {}
    seen_block = 0
    for node in gm.graph.nodes:
        b = q._block_of(node, blocks)
        if b is not None:
            part[node] = b + 1
            seen_block = max(seen_block, b + 1)
        elif node.op in ("placeholder", "get_attr", "output"):
            part[node] = 0
        elif seen_block == 0:
            part[node] = 0
        elif seen_block == last:
            part[node] = last + 1
        else:
            # glue between two blocks belongs with the block before it
            part[node] = seen_block
    return part


@dataclass
class Stage:
    index: int
    kind: str  # "prologue", "block", "epilogue"
    node: Node  # call_module node in the split graph
    module: GraphModule
    block: int | None  # block index for kind == "block"


class StagedGraph:
    """A GraphModel's graph split into sequential stages (sharing its weights)."""

    def __init__(self, gmodel: GraphModel) -> None:
        self.gmodel = gmodel
        part = stage_assignment(gmodel.gm)
        self.split = split_module(gmodel.gm, gmodel.gm, lambda n: part[n], keep_original_order=True)
        nblocks = len(gmodel.blocks)
        self.stages: list[Stage] = []
        for node in self.split.graph.nodes:
            if node.op == "call_module" and node.target.startswith("submod_"):
                idx = int(node.target.split("_")[1])
                kind = "prologue" if idx == 0 else ("epilogue" if idx == nblocks + 1 else "block")
                mod = getattr(self.split, node.target)
                self.stages.append(Stage(idx, kind, node, mod, idx - 1 if kind == "block" else None))
        # each operator node of the graph -> its copy in its stage (same order, same target)
        self.copies: dict[Node, Node] = {}
        by_stage: dict[int, list[Node]] = {}
        for n in gmodel.gm.graph.nodes:
            if n.op == "call_function":
                by_stage.setdefault(part[n], []).append(n)
        for stage in self.stages:
            mine = by_stage.get(stage.index, [])
            theirs = [n for n in stage.module.graph.nodes if n.op == "call_function"]
            if len(mine) == len(theirs) and all(a.target == b.target for a, b in zip(mine, theirs, strict=True)):
                self.copies.update(zip(mine, theirs, strict=True))

    @property
    def block_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "block"]


class StageForward(Protocol):
    """What a stage callback is given: runs the stage on every micro-batch (see
    :meth:`StageRunner.run`)."""

    def __call__(self, observe_only: bool = False, last: bool = False) -> list[Any]: ...


class StageRunner:
    """Runs a :class:`StagedGraph` stage by stage over micro-batches.

    Args:
        staged: the split graph.
        batches: token-id micro-batches ``[b, L]`` fed to the graph's input.
        compute_dtype: run the block stages under autocast to this dtype (``torch.bfloat16``:
            reduced-precision calibration forwards); ``None`` runs them as the weights are. The
            prologue (embedding, rotary tables, masks) always runs in the weights' dtype, and
            calibration observers disable autocast for their own accumulation.
    """

    def __init__(self, staged: StagedGraph, batches: Sequence[Tensor], compute_dtype: torch.dtype | None = None) -> None:
        self.staged = staged
        self.batches = list(batches)
        self.compute_dtype = compute_dtype

    def _precision(self, stage: Stage) -> Any:
        """The autocast context a stage's forward runs in (a no-op one for the prologue and epilogue,
        or without a compute dtype)."""
        if self.compute_dtype is None or stage.kind != "block" or not self.batches:
            return contextlib.nullcontext()
        return torch.autocast(self.batches[0].device.type, dtype=self.compute_dtype)

    @staticmethod
    def observer_interpreter(stage: Stage) -> torch.fx.Interpreter:
        """An interpreter of ``stage``'s module restricted to the nodes its observers depend
        on (the observers themselves are kept; the stage's outputs are not computed). It reads
        the module's weights when it runs, so weights swapped in by a stage hook are seen."""
        graph = torch.fx.Graph()
        graph.graph_copy(stage.module.graph, {})
        graph.output(None)

        def kept(node: Node) -> bool:
            if node.op == "call_module":  # observers mark themselves impure (fx's ``_is_impure``)
                return bool(getattr(stage.module.get_submodule(str(node.target)), "_is_impure", False))
            # mutations and other side effects stay; random ops (dropout, attention's dropout
            # argument) are inert in a no-grad evaluation forward and may go
            return node.op in ("placeholder", "output") or node.is_impure(impure_random=False)

        graph.eliminate_dead_code(is_impure_node=kept)
        return torch.fx.Interpreter(stage.module, graph=graph)

    @torch.no_grad()
    def run(
        self,
        on_stage: Callable[[Stage, StageForward], None] | None = None,
        stop_before_epilogue: bool = True,
    ) -> list[Any] | None:
        """Execute; ``on_stage(stage, forward)`` is called for each block stage *instead of*
        running it, and must call ``forward()`` (any number of times) -- the last call's
        per-batch outputs are what later stages read.

        ``forward(observe_only=True)`` runs only what the stage's observers read (a calibration
        forward: in a decoder block everything after the input of its last observed Linear, the
        down projection and the residual add, is skipped) and returns no outputs; a stage
        callback must end with a plain ``forward()``. ``forward(last=True)`` declares that call
        the stage's last: each micro-batch's inputs that no later stage reads are dropped as
        soon as its outputs exist, so the stage's inputs and outputs are not both held whole
        (one activation buffer less at the peak); the stage cannot run again after it.

        Returns the per-batch graph outputs, or None when stopping before the epilogue.
        """
        graph = self.staged.split.graph
        n = len(self.batches)
        last_use: dict[Node, Node] = {}
        for node in graph.nodes:
            for src in node.all_input_nodes:
                last_use[src] = node
        env: dict[Node, Any] = {}
        stage_by_node = {s.node: s for s in self.staged.stages}
        root = self.staged.split

        def resolve(target: str) -> Any:
            obj: Any = root
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj

        def value(a: Node, i: int) -> Any:
            v = env[a]
            if isinstance(v, _PerBatch):
                return v[i]
            if isinstance(v, _Attr):  # read at use time: a stage hook may have swapped the parameter
                return resolve(v.target)
            return v

        def fetch(arg: Any, i: int) -> Any:
            return torch.fx.node.map_arg(arg, lambda a: value(a, i))

        def make_forward(node: Node, stage: Stage) -> StageForward:
            observer: list[torch.fx.Interpreter] = []  # built at the first observe-only call, gone with the stage
            finished: list[bool] = []  # set by a call with last=True

            def forward(observe_only: bool = False, last: bool = False) -> list[Any]:
                if finished:
                    raise RuntimeError(f"stage {stage.index} ran again after its last forward released its inputs")
                env.pop(node, None)  # a repeated call: the previous outputs are superseded
                observing = observe_only and not node.kwargs
                if observing and not observer:
                    observer.append(self.observer_interpreter(stage))
                # per-batch inputs read by no later node: each batch's is dropped once its outputs exist
                spent = [env[a] for a in node.all_input_nodes if last_use.get(a) is node and isinstance(env.get(a), _PerBatch)]
                if last and not observing:
                    finished.append(True)
                else:
                    spent = []
                outs = []
                for i in range(n):
                    args = fetch(node.args, i)
                    if observing:
                        try:
                            with self._precision(stage):
                                observer[0].run(*args)
                        finally:
                            observer[0].env.clear()  # the observers' unused outputs would otherwise stay
                        continue
                    with self._precision(stage):
                        outs.append(stage.module(*args, **fetch(node.kwargs, i)))
                    del args
                    for values in spent:
                        values[i] = None
                if observing:
                    return []
                env[node] = _PerBatch(outs)
                return outs

            return forward

        for node in graph.nodes:
            if node.op == "placeholder":
                env[node] = _PerBatch(self.batches)
            elif node.op == "get_attr":
                resolve(node.target)  # fails early on a missing attribute
                env[node] = _Attr(node.target)
            elif node.op == "call_function" and node.target is operator.getitem:
                env[node] = _PerBatch([fetch(node.args, i)[0][node.args[1]] for i in range(n)])
            elif node.op == "call_module":
                stage = stage_by_node[node]
                if stage.kind == "epilogue" and stop_before_epilogue:
                    return None
                forward = make_forward(node, stage)
                if stage.kind == "block" and on_stage is not None:
                    on_stage(stage, forward)
                    if node not in env:
                        raise RuntimeError(f"stage callback for stage {stage.index} did not run the stage")
                else:
                    forward(last=True)
            elif node.op == "output":
                return [fetch(node.args, i)[0] for i in range(n)]
            else:  # pragma: no cover - split graphs only hold the kinds above
                raise RuntimeError(f"unexpected node {node.format_node()} in split graph")
            for src in node.all_input_nodes:
                if last_use.get(src) is node and src in env:
                    del env[src]
        return None


@dataclass(frozen=True)
class _Attr:
    """A weight of the split graph's root, looked up when a stage reads it."""

    target: str


class _PerBatch(list):
    """A value that differs per micro-batch (as opposed to a shared weight)."""
