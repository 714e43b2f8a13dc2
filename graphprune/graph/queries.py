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
_TRANSPARENT = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.alias.default}


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
class NormInfo:
    kind: str  # "rmsnorm" or "layernorm"
    name: str
    input: Node  # the (residual-stream) value normalised
    output: Node  # the scaled output read by the next Linears
    weight: str | None
    bias: str | None
    eps: float
    block: int | None = None


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
            # normalised = x * rsqrt(...), possibly dtype-converted, then scaled by a 1-D weight
            normed = next((u for u in node.users if u.target is aten.mul.Tensor and x in u.args), None)
            if normed is None:
                continue
            out, weight = normed, None
            frontier = [normed]
            while frontier:
                cur = frontier.pop()
                for user in cur.users:
                    if user.target in _TRANSPARENT:
                        frontier.append(user)
                    elif user.target is aten.mul.Tensor:
                        attrs = [a for a in user.args if _get_attr_target(a) and len(_attr_shape(gm, a.target)) == 1]
                        if attrs:
                            out, weight = user, attrs[0].target
                            frontier = []
                            break
            norms.append(NormInfo("rmsnorm", module_path(node), see_through(x), out, weight, None, eps, _block_of(node, blocks)))
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
