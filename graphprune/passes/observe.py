"""InsertObserversPass / RemoveObserversPass: calibration observers on Linear input values.

1. For every value read by at least one selected Linear, one identity ``call_module``
   node is inserted right after it and those Linears read the observer's output instead:
   q/k/v share one observer (and one Hessian), gate/up share one.
2. Observers are off until a stage enables them; when on, they accumulate ``Σ xxᵀ``
   (float32 per micro-batch, summed in float64) and ``Σ x²`` per column, with a token count.
   ``XᵀX`` is symmetric, so only its upper triangle is accumulated, one band of
   ``XTX_BAND`` rows at a time (half the multiply-adds of the full product for wide inputs,
   and a transient of one band instead of a whole float32 + float64 copy of the matrix);
   the lower triangle is mirrored in when the statistics are read.
3. Unless ``experts=False``, each batched expert weight's routed input gets an
   :class:`ExpertInputObserver` that splits the rows by expert (the grouped product's
   offsets), so every expert has the statistics of the tokens routed to it only.
4. RemoveObserversPass rewires the Linears to the original values and deletes the nodes.
"""
from __future__ import annotations

import fnmatch
import time
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.fx import Node

from graphprune.errors import SolverError
from graphprune.graph import queries as q
from graphprune.graph.model import GraphModel
from graphprune.passes.infra import Pass, PassContext, PassResult, Prop
from graphprune.solvers.base import LayerStats

OBSERVER_PREFIX = "gp_observer_"
XTX_BAND = 512  # rows of XᵀX accumulated per matrix product


def xtx_bands(n: int) -> list[tuple[int, int]]:
    """Row bands ``[i, j)`` of the upper-triangular ``XᵀX`` accumulation of an ``n``-wide input."""
    return [(i, min(i + XTX_BAND, n)) for i in range(0, n, XTX_BAND)]


def xtx_macs(n: int, tokens: int) -> int:
    """Multiply-adds of accumulating ``XᵀX`` of ``tokens`` rows of an ``n``-wide input band by band
    (each band ``[i, j)`` is multiplied with columns ``i..n``)."""
    return tokens * sum((j - i) * (n - i) for i, j in xtx_bands(n))


def accumulate(flat: Tensor, col_sq: Tensor, col_sum: Tensor, xtx: Tensor | None) -> None:
    """Add the rows ``flat [tokens, in]`` (float32) to the float64 accumulators, in place: column
    squares, column sums and, when ``xtx`` is given, the upper triangle of ``XᵀX`` band by band.
    Autocast is off here: under reduced-precision calibration forwards the statistics are still
    float32 products summed in float64."""
    with torch.autocast(flat.device.type, enabled=False):
        _accumulate(flat.float(), col_sq, col_sum, xtx)


def _accumulate(flat: Tensor, col_sq: Tensor, col_sum: Tensor, xtx: Tensor | None) -> None:
    col_sq += flat.pow(2).sum(0).double()
    col_sum += flat.sum(0).double()
    if xtx is not None:
        for i, j in xtx_bands(flat.shape[1]):
            xtx[i:j, i:] += (flat[:, i:j].T @ flat[:, i:]).double()


def mirror(xtx: Tensor) -> None:
    """Copy the accumulated upper triangle of ``XᵀX`` into the lower one, band by band, in place."""
    for i, j in xtx_bands(xtx.shape[-1]):
        xtx[j:, i:j] = xtx[i:j, j:].T
        diag = xtx[i:j, i:j]  # a float32 product's square is not exactly symmetric
        diag.copy_(diag.triu() + diag.triu(1).T)


def check_accumulated(name: str, count: int, col_sq: Tensor) -> None:
    """Refuse statistics an observer never fed, or that overflowed."""
    if count == 0:
        raise SolverError(f"observer {name} saw no calibration tokens; the stage was not calibrated.")
    if not torch.isfinite(col_sq).all():
        raise SolverError(
            f"calibration statistics of {name} contain NaN/Inf: the activations overflowed; "
            "check the model weights and use float32."
        )


class InputObserver(nn.Module):
    """Identity module that accumulates statistics of its input when enabled."""

    _is_impure = True  # fx: a side effect (the statistics), kept by dead-code elimination

    def __init__(self, name: str, in_features: int, hessian: bool) -> None:
        super().__init__()
        self.name = name
        self.in_features = in_features
        self.hessian = hessian
        self.enabled = False
        self.release()  # accumulators are allocated by reset() or the first enabled forward

    def reset(self) -> None:
        self.count = 0
        self.seconds = 0.0  # time spent accumulating (the statistics share of a calibration forward)
        self.col_sq = torch.zeros(self.in_features, dtype=torch.float64)
        self.col_sum = torch.zeros(self.in_features, dtype=torch.float64)
        self.xtx: Tensor | None = torch.zeros(self.in_features, self.in_features, dtype=torch.float64) if self.hessian else None

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled:
            t0 = time.perf_counter()
            if self.col_sq.numel() != self.in_features:
                self.reset()
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            accumulate(flat, self.col_sq, self.col_sum, self.xtx)
            self.count += flat.shape[0]
            self.seconds += time.perf_counter() - t0
        return x

    def all_reduce(self, dist: Any) -> None:
        """Sum the accumulators over the ranks of ``dist`` (a :class:`graphprune.distributed.Dist`)."""
        if not dist.active:
            return
        if self.col_sq.numel() != self.in_features:
            self.reset()  # this rank fed nothing: it contributes zeros of the right shape
        dist.all_reduce_(self.col_sq)
        dist.all_reduce_(self.col_sum)
        if self.xtx is not None:
            dist.all_reduce_(self.xtx)
        self.count = int(dist.all_reduce_float(float(self.count)))

    def release(self) -> None:
        """Drop the accumulators (their memory goes back) until the next :meth:`reset`."""
        self.count = 0
        self.col_sq = self.col_sum = torch.zeros(0, dtype=torch.float64)
        self.xtx = None

    def stats(self, copy: bool = True) -> LayerStats:
        """The accumulated statistics. ``copy=False`` hands the observer's own tensors over (no
        second copy of ``XᵀX``); call :meth:`release` or :meth:`reset` before accumulating again."""
        check_accumulated(self.name, self.count, self.col_sq)
        if self.xtx is not None:
            mirror(self.xtx)
        if not copy:
            return LayerStats(col_sq=self.col_sq, count=self.count, xtx=self.xtx, col_sum=self.col_sum)
        return LayerStats(
            col_sq=self.col_sq.clone(), count=self.count, xtx=None if self.xtx is None else self.xtx.clone(), col_sum=self.col_sum.clone()
        )


class ExpertInputObserver(nn.Module):
    """Identity on the routed tokens of a grouped expert product that accumulates each
    expert's statistics from the rows routed to it (and only those).

    Called as ``observer(x, offsets)``: ``x`` holds the tokens sorted by expert, expert ``e``'s
    rows end at ``offsets[e]``. ``count`` is the rows seen over all experts, ``counts`` per expert.
    """

    _is_impure = True

    def __init__(self, name: str, in_features: int, experts: int, hessian: bool) -> None:
        super().__init__()
        self.name = name
        self.in_features = in_features
        self.experts = experts
        self.hessian = hessian
        self.enabled = False
        self.release()

    def reset(self) -> None:
        e, n = self.experts, self.in_features
        self.count = 0
        self.seconds = 0.0
        self.counts = torch.zeros(e, dtype=torch.int64)
        self.col_sq = torch.zeros(e, n, dtype=torch.float64)
        self.col_sum = torch.zeros(e, n, dtype=torch.float64)
        self.xtx: Tensor | None = torch.zeros(e, n, n, dtype=torch.float64) if self.hessian else None
        self._mirrored = False

    def release(self) -> None:
        self.count = 0
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.col_sq = self.col_sum = torch.zeros(0, dtype=torch.float64)
        self.xtx = None
        self._mirrored = False

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        if self.enabled:
            t0 = time.perf_counter()
            if self.counts.numel() != self.experts:
                self.reset()
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            start = 0
            for e, end in enumerate(offsets.tolist()[: self.experts]):
                end = int(round(end))
                if end > start:
                    accumulate(flat[start:end], self.col_sq[e], self.col_sum[e], None if self.xtx is None else self.xtx[e])
                    self.counts[e] += end - start
                start = max(start, end)
            self.count += flat.shape[0]
            self.seconds += time.perf_counter() - t0
        return x

    def all_reduce(self, dist: Any) -> None:
        """Sum the accumulators over the ranks of ``dist``."""
        if not dist.active:
            return
        if self.counts.numel() != self.experts:
            self.reset()
        for t in (self.col_sq, self.col_sum, *(() if self.xtx is None else (self.xtx,))):
            dist.all_reduce_(t)
        self.counts = torch.tensor([int(dist.all_reduce_float(float(c))) for c in self.counts.tolist()], dtype=torch.int64)
        self.count = int(dist.all_reduce_float(float(self.count)))

    def stats(self, expert: int) -> LayerStats | None:
        """Expert ``expert``'s statistics (views of the accumulators), or None when no
        calibration token was routed to it."""
        check_accumulated(self.name, self.count, self.col_sq)
        if self.xtx is not None and not self._mirrored:
            for e in range(self.experts):
                mirror(self.xtx[e])
            self._mirrored = True
        count = int(self.counts[expert])
        if count == 0:
            return None
        xtx = None if self.xtx is None else self.xtx[expert]
        return LayerStats(col_sq=self.col_sq[expert], count=count, xtx=xtx, col_sum=self.col_sum[expert])


def through_observers(gm: GraphModel) -> Callable[[Node], Node]:
    """Maps an observer node of ``gm`` to the value it observes, any other node to itself
    (for graph walks that must see through the identity observers)."""
    observers = set(gm.state.observers.values())

    def skip(node: Node) -> Node:
        if node.op == "call_module" and node.target in observers and isinstance(node.args[0], Node):
            return node.args[0]
        return node

    return skip


def _selected(name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def select_linears(gm: GraphModel, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()) -> list[q.LinearInfo]:
    """Block Linears whose names match an ``include`` glob and no ``exclude`` glob."""
    inc, exc = list(include), list(exclude)
    return [li for li in gm.block_linears() if _selected(li.name, inc, exc)]


def select_experts(gm: GraphModel, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()) -> list[q.ExpertInfo]:
    """Block experts (``model.layers.0.mlp.experts.3.down_proj``) matching the globs likewise."""
    inc, exc = list(include), list(exclude)
    return [e for e in gm.experts if _selected(e.name, inc, exc)]


def _insert_observer(gm: GraphModel, module: nn.Module, first: Node, args: tuple[Node, ...]) -> tuple[str, Node]:
    """Add ``module`` as the next ``gp_observer_<i>`` and call it on ``args`` right before
    ``first`` (its first reader, whose block it is attributed to); returns ``(attr, node)``."""
    attr = f"{OBSERVER_PREFIX}{len([n for n in gm.gm._modules if n.startswith(OBSERVER_PREFIX)])}"
    gm.gm.add_submodule(attr, module)
    with gm.gm.graph.inserting_before(first):
        obs = gm.gm.graph.call_module(attr, args)
    obs.meta = dict(args[0].meta)
    if "nn_module_stack" in first.meta:
        obs.meta["nn_module_stack"] = first.meta["nn_module_stack"]
    return attr, obs


class InsertObserversPass(Pass):
    """Insert one observer per distinct input value of the selected Linears."""

    name = "insert_observers"
    establishes = frozenset({Prop.OBSERVERS})
    preserves_function = True
    edits_weights = False  # the graph gains or loses identity modules; the weights stay

    def __init__(self, hessian: bool = True, include: Iterable[str] = ("*",), exclude: Iterable[str] = (), experts: bool = True) -> None:
        self.hessian = hessian
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.experts = experts  # also observe the batched experts, each expert on its own routed rows

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        linears = select_linears(gm, self.include, self.exclude)
        mapping: dict[str, str] = dict(gm.state.observers)
        graph = gm.gm.graph
        added = 0
        order = {n: i for i, n in enumerate(graph.nodes)}
        for value, group in q.group_by_input(linears).items():
            if all(li.name in mapping for li in group):
                continue
            # placed at, and attributed to, the first reader: a Linear reading a value made in an
            # earlier block (OLMo2's q/k/v read the stream itself) is observed in its own block's stage
            first = min((li.node for li in group), key=order.__getitem__)
            attr, obs = _insert_observer(gm, InputObserver(group[0].name, group[0].in_features, self.hessian), first, (value,))
            for li in group:
                li.node.replace_input_with(value, obs)
                mapping[li.name] = attr
            added += 1
        if self.experts:
            added += self._observe_experts(gm, mapping)
        gm.state.observers = mapping
        gm.lint()
        gm.invalidate()
        return PassResult(gm, modified=added > 0, stats={"observers": added, "linears": len(linears)})

    def _observe_experts(self, gm: GraphModel, mapping: dict[str, str]) -> int:
        """One :class:`ExpertInputObserver` per routed input (and its offsets) of the selected experts."""
        groups: dict[tuple[Node, Node], list[q.ExpertInfo]] = {}
        for e in select_experts(gm, self.include, self.exclude):
            groups.setdefault((e.input, e.offsets), []).append(e)
        added = 0
        for (value, offsets), group in groups.items():
            if all(e.name in mapping for e in group):
                continue
            label = group[0].name.rsplit(".", 2)[0] + ".*." + group[0].name.rsplit(".", 1)[-1]
            module = ExpertInputObserver(label, group[0].in_features, group[0].experts, self.hessian)
            attr, obs = _insert_observer(gm, module, group[0].node, (value, offsets))
            for node in {e.node for e in group}:
                node.replace_input_with(value, obs)
            for e in group:
                mapping[e.name] = attr
            added += 1
        return added


class RemoveObserversPass(Pass):
    """Rewire Linears to the observed values and delete the observer nodes and modules."""

    name = "remove_observers"
    invalidates = frozenset({Prop.OBSERVERS})
    preserves_function = True
    edits_weights = False  # the graph gains or loses identity modules; the weights stay

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        graph = gm.gm.graph
        removed = 0
        for node in list(graph.nodes):
            if node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                gm.gm.delete_submodule(node.target)
                removed += 1
        gm.state.observers = {}
        gm.lint()
        gm.invalidate()
        return PassResult(gm, modified=removed > 0, stats={"removed": removed})


def observer_for(gm: GraphModel, linear_name: str) -> InputObserver:
    attr = gm.state.observers.get(linear_name)
    if attr is None:
        raise SolverError(f"{linear_name} has no observer; run InsertObserversPass first.")
    return getattr(gm.gm, attr)
