"""Graph queries: Linears and the values they read, norms, embedding, LM head, blocks.

Everything here is found from the captured graph itself -- operator patterns and the
``nn_module_stack`` metadata that torch.export attaches to each node -- never from a
list of module names, so any LLaMA-, OPT- or similar-shaped decoder works.

* A **Linear** is an ``aten.linear`` node whose weight is a ``get_attr`` node.
* A **norm** is either ``aten.layer_norm`` or the RMSNorm pattern
  ``x * rsqrt(mean(x**2) + eps)`` followed by a multiplication with a 1-D scale.
* The **embedding** is ``aten.embedding`` on a ``get_attr`` table.
* The **LM head** is the Linear whose result reaches the graph output with no other
  Linear in between.
* A **block** is a module on the ``nn_module_stack`` whose path ends in an integer
  index (an element of a ``ModuleList``) and that contains Linears -- a decoder layer.
* An **expert** is one slice ``W[e]`` of a batched 3-D weight that a grouped matrix
  product (``grouped_mm``: tokens sorted by expert, cumulative row offsets per expert)
  multiplies with its expert's rows: transformers 5 keeps MoE experts this way, not as
  ``nn.Linear``. Each expert is addressed like a Linear of its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from graphprune.graph.capture import ROOT

aten = torch.ops.aten
_BLOCK_PATH = re.compile(r"^(.*)\.(\d+)$")
# Operators that only convert dtype or check metadata: see through them.
_TRANSPARENT = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.alias.default, aten.type_as.default}


def strip_root(name: str) -> str:
    """``lm.model.layers.0.q_proj.weight`` -> ``model.layers.0.q_proj.weight`` (the model's own name)."""
    return name[len(ROOT) + 1 :] if name.startswith(ROOT + ".") else name


def module_path(node: Node) -> str:
    """Path of the innermost module that produced ``node`` ('' when none)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return strip_root(path) if isinstance(path, str) else ""


def module_paths(node: Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [strip_root(v[0]) for v in stack.values() if isinstance(v[0], str)]


def see_through(node: Node) -> Node:
    """Follow dtype conversions back to the value they convert."""
    while node.op == "call_function" and node.target in _TRANSPARENT and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


@dataclass
class LinearInfo:
    """One ``aten.linear`` node and what it reads."""

    node: Node
    name: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    weight: str  # get_attr target of the weight (graph attribute name)
    bias: str | None
    input: Node  # the value it reads (shared by q/k/v, by gate/up)
    out_features: int
    in_features: int
    block: int | None = None

    @property
    def param_name(self) -> str:
        """The weight's name in the model's state dict."""
        return strip_root(self.weight)


@dataclass
class ExpertInfo:
    """One expert of a batched expert weight, seen as a Linear ``[out, in]`` of its own.

    The grouped product ``node`` computes ``x[rows_e] @ B[e]`` for each expert ``e``, where
    ``B`` is ``[experts, in, out]`` and expert ``e``'s rows of the sorted input ``input`` end
    at ``offsets[e]``. ``B`` is the parameter ``weight`` itself or, when ``transposed``, its
    ``transpose(-2, -1)`` (the parameter is stored ``[experts, out, in]``, as
    ``nn.Linear`` weights are).
    """

    node: Node
    name: str  # e.g. model.layers.0.mlp.experts.3.down_proj: the parameter's module, the expert, the parameter
    weight: str  # get_attr target of the 3-D parameter
    index: int  # the expert
    input: Node  # the routed tokens, sorted by expert
    offsets: Node  # cumulative row counts per expert
    out_features: int
    in_features: int
    transposed: bool
    experts: int  # experts in the parameter
    block: int | None = None

    @property
    def param_name(self) -> str:
        """The 3-D parameter's name in the model's state dict."""
        return strip_root(self.weight)


@dataclass
class NormInfo:
    kind: str  # "rmsnorm" or "layernorm"
    name: str
    input: Node  # the (residual-stream) value normalised
    output: Node  # the scaled output read by the next Linears
    weight: str | None
    bias: str | None
    eps: float
    block: int | None = None
    #: the scale is ``weight + offset`` (Gemma's RMSNorm multiplies by ``1 + w``)
    offset: float = 0.0
    #: a LayerNorm written out as arithmetic: its ``mean`` and ``x - mean`` nodes
    internals: tuple[Node, ...] = ()


@dataclass
class BlockInfo:
    index: int
    name: str  # module path, e.g. model.layers.3
    nodes: list[Node] = field(default_factory=list)
    linears: list[LinearInfo] = field(default_factory=list)
    norms: list[NormInfo] = field(default_factory=list)


def _get_attr_target(node: object) -> str | None:
    return node.target if isinstance(node, Node) and node.op == "get_attr" else None  # type: ignore[return-value]


def _attr_shape(gm: GraphModule, target: str) -> tuple[int, ...]:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return tuple(obj.shape)


def find_blocks(gm: GraphModule) -> list[str]:
    """Decoder-block module paths in execution order (ModuleList elements holding Linears)."""
    order: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        for path in module_paths(node):
            if _BLOCK_PATH.match(path) and path not in order:
                order.append(path)
                break
    return order


def _block_of(node: Node, blocks: dict[str, int]) -> int | None:
    for path in module_paths(node):
        if path in blocks:
            return blocks[path]
    return None


def find_linears(gm: GraphModule) -> list[LinearInfo]:
    blocks = {p: i for i, p in enumerate(find_blocks(gm))}
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.linear.default:
            w = _get_attr_target(node.args[1])
            if w is None:
                continue  # a linear on computed weights is not a prunable Linear
            b = _get_attr_target(node.args[2]) if len(node.args) > 2 else None
            o, i = _attr_shape(gm, w)
            out.append(LinearInfo(node, module_path(node) or node.name, w, b, node.args[0], o, i, _block_of(node, blocks)))
    return out


def _is_grouped_mm(node: Node) -> bool:
    """A grouped matrix product ``(input, weight[E, in, out], offsets)``: ``aten._grouped_mm``
    or transformers' fallback operator of the same contract."""
    return node.op == "call_function" and "grouped_mm" in str(node.target) and len(node.args) >= 3


def _expert_weight(node: object) -> tuple[str, bool] | None:
    """``(parameter target, transposed)`` for a grouped product's weight argument."""
    if not isinstance(node, Node):
        return None
    if node.op == "get_attr":
        return str(node.target), False
    if node.target is aten.transpose.int and len(node.args) == 3 and {int(a) % 3 for a in node.args[1:]} == {1, 2}:  # type: ignore[arg-type]
        target = _get_attr_target(node.args[0])
        return (target, True) if target is not None else None
    return None


def find_experts(gm: GraphModule) -> list[ExpertInfo]:
    """Every expert of every batched expert weight a grouped product reads, in graph order."""
    blocks = {p: i for i, p in enumerate(find_blocks(gm))}
    out = []
    for node in gm.graph.nodes:
        if not _is_grouped_mm(node):
            continue
        x, w, offsets = node.args[:3]
        found = _expert_weight(w)
        if found is None or not isinstance(x, Node) or not isinstance(offsets, Node):
            continue
        target, transposed = found
        shape = _attr_shape(gm, target)
        if len(shape) != 3:
            continue
        experts, a, b = shape
        out_f, in_f = (a, b) if transposed else (b, a)
        path, _, leaf = strip_root(target).rpartition(".")
        for e in range(experts):
            name = f"{path}.{e}.{leaf}" if path else f"{e}.{leaf}"
            out.append(ExpertInfo(node, name, target, e, x, offsets, out_f, in_f, transposed, experts, _block_of(node, blocks)))
    return out


def _rms_input(rsqrt: Node) -> Node | None:
    """x for ``rsqrt(mean(pow(x, 2)) + eps)``, else None."""
    add = rsqrt.args[0]
    if not (isinstance(add, Node) and add.target in (aten.add.Tensor, aten.add.Scalar)):
        return None
    mean = add.args[0]
    if not (isinstance(mean, Node) and mean.target is aten.mean.dim):
        return None
    pw = mean.args[0]
    if not (isinstance(pw, Node) and pw.target is aten.pow.Tensor_Scalar and pw.args[1] == 2):
        return None
    return pw.args[0] if isinstance(pw.args[0], Node) else None


def _centred(x: Node) -> tuple[Node, Node] | None:
    """``(y, mean)`` when ``x`` is ``y - mean(y, -1, keepdim)``."""
    if x.target is not aten.sub.Tensor or len(x.args) != 2:
        return None
    y, mean = x.args
    if isinstance(y, Node) and isinstance(mean, Node) and mean.target is aten.mean.dim and mean.args[0] is y and list(mean.args[1]) == [-1]:  # type: ignore[arg-type]
        return y, mean
    return None


def _norm_scale(gm: GraphModule, arg: object) -> tuple[str, float] | None:
    """``(weight target, offset)`` when ``arg`` is a 1-D weight, or ``weight + c`` (seen through conversions)."""
    if not isinstance(arg, Node):
        return None
    arg = see_through(arg)
    target = _get_attr_target(arg)
    if target is not None:
        return (target, 0.0) if len(_attr_shape(gm, target)) == 1 else None
    if arg.target in (aten.add.Tensor, aten.add.Scalar) and len(arg.args) == 2 and isinstance(arg.args[1], (int, float)):
        inner = see_through(arg.args[0]) if isinstance(arg.args[0], Node) else None
        target = _get_attr_target(inner)
        if target is not None and len(_attr_shape(gm, target)) == 1:
            return target, float(arg.args[1])
    return None


def find_norms(gm: GraphModule) -> list[NormInfo]:
    blocks = {p: i for i, p in enumerate(find_blocks(gm))}
    norms: list[NormInfo] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.layer_norm.default:
            w = _get_attr_target(node.args[2]) if len(node.args) > 2 else None
            b = _get_attr_target(node.args[3]) if len(node.args) > 3 else None
            eps = float(node.args[4]) if len(node.args) > 4 else 1e-5
            norms.append(NormInfo("layernorm", module_path(node), see_through(node.args[0]), node, w, b, eps, _block_of(node, blocks)))
        elif node.target is aten.rsqrt.default:
            x = _rms_input(node)
            if x is None:
                continue
            eps = float(node.args[0].args[1])
            kind = "rmsnorm"
            internals: tuple[Node, ...] = ()
            centred = _centred(x)
            if centred is not None:  # LayerNorm written out: (y - mean y) * rsqrt(var + eps) (Cohere)
                y, mean = centred
                subs = [u for u in mean.users if u.target is aten.sub.Tensor and u.args == (y, mean)]
                normed = next((u for u in node.users if u.target is aten.mul.Tensor and any(a in subs for a in u.args)), None)
                kind, internals, x = "layernorm", (mean, *subs), y
            else:
                # normalised = x * rsqrt(...), possibly dtype-converted, then scaled by a 1-D weight
                normed = next((u for u in node.users if u.target is aten.mul.Tensor and x in u.args), None)
            if normed is None:
                continue
            out, weight, offset = normed, None, 0.0
            frontier = [normed]
            while frontier:
                cur = frontier.pop()
                for user in cur.users:
                    if user.target in _TRANSPARENT:
                        frontier.append(user)
                    elif user.target is aten.mul.Tensor:
                        scale = next((sc for sc in map(lambda a: _norm_scale(gm, a), user.args) if sc is not None), None)
                        if scale is not None:
                            out, (weight, offset) = user, scale
                            frontier = []
                            break
            norms.append(NormInfo(kind, module_path(node), see_through(x), out, weight, None, eps, _block_of(node, blocks), offset, internals))
    return norms


def find_embedding(gm: GraphModule) -> tuple[Node, str] | None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default:
            w = _get_attr_target(node.args[0])
            if w is not None:
                return node, w
    return None


def find_lm_head(gm: GraphModule, linears: Iterable[LinearInfo] | None = None) -> LinearInfo | None:
    """The Linear that writes the logits: its result reaches the output through no other Linear."""
    linears = list(find_linears(gm) if linears is None else linears)
    by_node = {li.node: li for li in linears}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    seen: set[Node] = set()
    frontier = [a for a in output.all_input_nodes]
    while frontier:
        cur = frontier.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur in by_node:
            return by_node[cur]
        frontier.extend(cur.all_input_nodes)
    return None


def is_router(node: Node, depth: int = 8) -> bool:
    """True when a Linear's output selects experts: it reaches ``aten.topk`` within ``depth``
    operators (softmax, conversions). Routers stay dense: pruning one changes which experts run."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for cur in frontier:
            for user in cur.users:
                if user.target is aten.topk.default:
                    return True
                if user not in seen and user.target is not aten.linear.default:
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    return False


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """Dataflow view: one vertex per fx node (by name), edges from producer to consumer."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target), module=module_path(node))
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def group_by_input(linears: Iterable[LinearInfo]) -> dict[Node, list[LinearInfo]]:
    """Linears grouped by the value they read (q/k/v share one, gate/up share one)."""
    groups: dict[Node, list[LinearInfo]] = {}
    for li in linears:
        groups.setdefault(li.input, []).append(li)
    return groups


def find_block_infos(gm: GraphModule) -> list[BlockInfo]:
    paths = find_blocks(gm)
    infos = [BlockInfo(i, p) for i, p in enumerate(paths)]
    index = {p: i for i, p in enumerate(paths)}
    for node in gm.graph.nodes:
        b = _block_of(node, index)
        if b is not None:
            infos[b].nodes.append(node)
    for li in find_linears(gm):
        if li.block is not None:
            infos[li.block].linears.append(li)
    for ni in find_norms(gm):
        if ni.block is not None:
            infos[ni.block].norms.append(ni)
    return infos
