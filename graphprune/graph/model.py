"""GraphModel: a captured graph, the model that owns its weights, and what passes learn.

The captured ``GraphModule`` shares its parameters with the original Hugging Face
module (torch.export unlifting keeps the same tensors), so there is one source of truth
for every weight: a pass that prunes writes through :meth:`GraphModel.set_weight` and
both the graph and the model (which the exporters save) see the change.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, MutableMapping

import networkx as nx
import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from graphprune.errors import CaptureError, GraphPruneError
from graphprune.graph import queries as q
from graphprune.graph.capture import capture
from graphprune.graph.linears import standard_linears

log = logging.getLogger(__name__)


_BIT = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class PackedMasks(MutableMapping[str, Tensor]):
    """Linear name -> boolean keep-mask, stored at one bit per weight.

    A pruned model keeps a mask per pruned Linear for the passes after pruning (slicing, the
    kernel rewrite) and for checkpoints; as ``torch.bool`` they are a quarter of the float32
    weights (106 MiB on the default model), packed an eighth of that. Reading a name unpacks
    a fresh boolean tensor of the stored shape; writing one packs it.
    """

    def __init__(self, items: dict[str, Tensor] | None = None) -> None:
        self._packed: dict[str, tuple[Tensor, torch.Size]] = {}
        for name, mask in (items or {}).items():
            self[name] = mask

    def __setitem__(self, name: str, mask: Tensor) -> None:
        if mask.dtype != torch.bool:
            raise GraphPruneError(f"mask of {name} is {mask.dtype}; masks are boolean keep-masks (weight != 0).")
        flat = mask.detach().reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        packed = (flat.view(-1, 8) * _BIT.to(flat.device)).sum(1, dtype=torch.uint8)
        self._packed[name] = (packed, mask.shape)

    def __getitem__(self, name: str) -> Tensor:
        packed, shape = self._packed[name]
        bits = packed.unsqueeze(1).bitwise_and(_BIT.to(packed.device)).ne(0).reshape(-1)
        return bits[: shape.numel()].reshape(shape).clone()

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __repr__(self) -> str:
        return f"PackedMasks({', '.join(f'{n}: {tuple(s)}' for n, (_, s) in self._packed.items())})"

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed bits."""
        return sum(p.numel() for p, _ in self._packed.values())


@dataclass
class PassState:
    """What passes learn about a graph and hand to later passes and reports (typed, not string keys).

    Attributes:
        observers: Linear name -> attribute of the observer module reading its input
            (InsertObserversPass; emptied by RemoveObserversPass).
        masks: Linear name -> boolean keep-mask of its pruned weight (SequentialPrunePass),
            stored a bit per weight (:class:`PackedMasks`).
        stats: Linear name -> its calibration ``LayerStats`` (only with ``PruneConfig.keep_stats``).
        grad_sq: Linear name -> ``Σ g²`` of the LM loss per weight ``[out, in]`` (GradientStatsPass).
        prune_report: the pruning report (per-Linear sparsity, error, seconds; per-stage seconds).
        rotation: what RotatePass did (source, per-dimension importance, objective...).
        slicing: what SlicePass did (fraction, widths).
        structured: what StructuredPrunePass did (method, fraction, kept width and error per group).
        stream_centred: FoldNormsPass made the residual stream zero-mean (LayerNorm models).
        kernels: Linear name -> kernel choice and candidate timings (RewriteKernelsPass).
        export_blockers: reasons the graph can no longer be saved as a Hugging Face folder.
        adapters: names of the adapter Linears FoldNormsPass put behind post-block norms (kept dense).
    """

    observers: dict[str, str] = field(default_factory=dict)
    masks: PackedMasks = field(default_factory=PackedMasks)
    stats: dict[str, Any] = field(default_factory=dict)
    grad_sq: dict[str, Tensor] = field(default_factory=dict)
    prune_report: dict[str, Any] | None = None
    rotation: dict[str, Any] | None = None
    slicing: dict[str, Any] | None = None
    structured: dict[str, Any] | None = None
    stream_centred: bool = False
    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)
    export_blockers: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


@dataclass
class Snapshot:
    """A copy of a GraphModel's model, graph, properties and pass state (see :meth:`GraphModel.snapshot`)."""

    model: nn.Module
    gm: GraphModule
    props: set[str]
    state: PassState


class GraphModel:
    """A traced causal LM: ``GraphModel(ids) -> logits``.

    Attributes:
        model: the Hugging Face module owning the weights (saved by the exporters).
        gm: the captured ``torch.fx.GraphModule``.
        props: properties established by passes (see ``graphprune.passes.infra.Prop``).
        state: what passes record for later passes and reports (:class:`PassState`).
    """

    def __init__(self, model: nn.Module, gm: GraphModule, name: str = "model") -> None:
        self.model = model
        self.gm = gm
        self.name = name
        self.props: set[str] = set()
        self.state = PassState()
        self._cache: dict[str, Any] = {}

    @classmethod
    def capture(cls, model: nn.Module, example: Tensor | None = None, name: str = "model") -> "GraphModel":
        standard_linears(model)  # Conv1D and custom-forward Linear subclasses become nn.Linear (same state dict)
        gmod = cls(model, capture(model.eval(), example), name)
        if not gmod.linears:
            raise CaptureError(f"{name}: the captured graph has no aten.linear nodes on weights; nothing to prune.")
        if not gmod.blocks:
            raise CaptureError(
                f"{name}: no decoder blocks found (no ModuleList of layers holding Linears); "
                "graphprune supports decoder-only causal LMs."
            )
        return gmod

    def clone(self) -> "GraphModel":
        """An independent copy: model and graph are copied together, so they still share weights."""
        snap = self.snapshot()
        other = GraphModel(snap.model, snap.gm, self.name)
        other.props = snap.props
        other.state = snap.state
        return other

    def snapshot(self, weights: bool = True) -> Snapshot:
        """A deep copy of everything a pass may change, for :meth:`restore`.

        ``weights=False`` copies the module tree, graph and state but shares every parameter and
        buffer tensor with this model: enough to undo a pass that only edits the graph, for the
        memory of the structure instead of a second copy of the weights."""
        memo: dict[int, Any] = {}
        if not weights:
            for tensor in [*self.model.parameters(), *self.model.buffers(), *self.gm.parameters(), *self.gm.buffers()]:
                memo[id(tensor)] = tensor
        model, gm, state = copy.deepcopy((self.model, self.gm, self.state), memo)
        return Snapshot(model, gm, set(self.props), state)

    def restore(self, snap: Snapshot) -> None:
        """Make this GraphModel (and the very model object callers hold) what it was at ``snap``.

        The model is restored in place -- its module tree, parameters, buffers and config are
        replaced by the snapshot's -- so a reference to ``self.model`` (e.g. the loaded model
        the exporters save) sees the restored weights too.
        """
        vars(self.model).clear()
        vars(self.model).update(vars(snap.model))
        self.gm = snap.gm  # its parameters are the snapshot model's, now self.model's
        self.props = set(snap.props)
        self.state = snap.state
        self.invalidate()

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def __call__(self, input_ids: Tensor) -> Tensor:
        return self.gm(input_ids)

    @property
    def vocab_size(self) -> int:
        return int(getattr(getattr(self.model, "config", None), "vocab_size", 0))

    # ------------------------------------------------------------------ queries (cached)
    def _cached(self, key: str, fn: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def invalidate(self) -> None:
        """Forget cached queries (call after changing the graph's structure)."""
        self._cache.clear()

    @property
    def linears(self) -> list[q.LinearInfo]:
        return self._cached("linears", lambda: q.find_linears(self.gm))

    @property
    def norms(self) -> list[q.NormInfo]:
        return self._cached("norms", lambda: q.find_norms(self.gm))

    @property
    def blocks(self) -> list[q.BlockInfo]:
        return self._cached("blocks", lambda: q.find_block_infos(self.gm))

    @property
    def lm_head(self) -> q.LinearInfo | None:
        return self._cached("lm_head", lambda: q.find_lm_head(self.gm, self.linears))

    @property
    def embedding(self) -> tuple[Any, str] | None:
        return self._cached("embedding", lambda: q.find_embedding(self.gm))

    def block_linears(self) -> list[q.LinearInfo]:
        """The Linears inside decoder blocks (the ones pruned by default); MoE routers excepted."""
        routers = {li.node for li in self.routers}
        adapters = set(self.state.adapters)
        return [li for li in self.linears if li.block is not None and li.node not in routers and li.name not in adapters]

    @property
    def experts(self) -> list[q.ExpertInfo]:
        """Every expert of the decoder blocks' batched expert weights (one entry per expert)."""
        return self._cached("experts", lambda: [e for e in q.find_experts(self.gm) if e.block is not None])

    @property
    def routers(self) -> list[q.LinearInfo]:
        """Block Linears that score experts (their output reaches a top-k): kept dense."""
        return self._cached("routers", lambda: [li for li in self.linears if li.block is not None and q.is_router(li.node)])

    def block_matrices(self) -> dict[str, Tensor]:
        """Every parameter with two or more dimensions inside a decoder block, by state-dict name.

        Whatever module holds it: batched expert weights (transformers 5 keeps some as 3-D
        parameters, not ``nn.Linear``) count too, so reports can say what was not pruned.
        """
        prefixes = tuple(b.name + "." for b in self.blocks)
        return {n: p for n, p in self.model.named_parameters() if n.startswith(prefixes) and p.dim() >= 2}

    def networkx(self) -> nx.DiGraph:
        return q.to_networkx(self.gm)

    # ------------------------------------------------------------------ weights
    def get_attr(self, target: str) -> Tensor:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def matrix(self, info: q.LinearInfo | q.ExpertInfo) -> Tensor:
        """The ``[out, in]`` weight of a Linear or of one expert (a view of the parameter)."""
        param = self.get_attr(info.weight)
        if isinstance(info, q.ExpertInfo):
            return param[info.index] if info.transposed else param[info.index].T
        return param

    def set_matrix(self, info: q.LinearInfo | q.ExpertInfo, value: Tensor) -> None:
        """Overwrite a Linear's or one expert's ``[out, in]`` weight in place."""
        if not isinstance(info, q.ExpertInfo):
            self.set_weight(info.weight, value)
            return
        view = self.matrix(info)
        if tuple(view.shape) != tuple(value.shape):
            raise GraphPruneError(f"{info.name}: new value has shape {tuple(value.shape)} but the expert's weight is {tuple(view.shape)}.")
        with torch.no_grad():
            view.copy_(value.to(view.dtype))

    def set_weight(self, target: str, value: Tensor) -> None:
        """Overwrite a weight in place (same shape), visible to the graph and the model."""
        param = self.get_attr(target)
        if tuple(param.shape) != tuple(value.shape):
            raise GraphPruneError(
                f"{target}: new value has shape {tuple(value.shape)} but the weight is {tuple(param.shape)}; "
                "shape-changing rewrites must replace the attribute, not overwrite it."
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))

    def lint(self) -> None:
        """Check the graph is well formed and regenerate its code."""
        self.gm.graph.lint()
        self.gm.recompile()

    def summary(self) -> dict[str, Any]:
        """Node counts, Linears grouped by shared input, blocks: what ``graphprune inspect`` prints."""
        ops: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            ops[node.op] = ops.get(node.op, 0) + 1
        groups = [
            {"input": n.name, "linears": [li.name for li in lis], "in_features": lis[0].in_features}
            for n, lis in q.group_by_input(self.linears).items()
        ]
        head = self.lm_head
        emb = self.embedding
        return {
            "model": self.name,
            "nodes": len(self.gm.graph.nodes),
            "ops": ops,
            "linears": len(self.linears),
            "block_linears": len(self.block_linears()),
            "experts": [
                {"weight": q.strip_root(e.weight), "experts": e.experts, "shape": [e.out_features, e.in_features], "block": e.block}
                for e in self.experts if e.index == 0
            ],
            "linear_groups": groups,
            "norms": [{"name": n.name, "kind": n.kind, "block": n.block} for n in self.norms],
            "blocks": [{"index": b.index, "name": b.name, "linears": len(b.linears), "nodes": len(b.nodes)} for b in self.blocks],
            "embedding": q.strip_root(emb[1]) if emb else None,
            "lm_head": head.name if head else None,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
