"""Coupled structures found from the graph's dataflow: channels that must be removed together.

A *channel group* is a Linear (the consumer) whose input is computed from the outputs of
other Linears (the producers) by elementwise operators only: SwiGLU's
``down(silu(gate(x)) * up(x))``, OPT's ``fc2(relu(fc1(x)))``, GELU MLPs, fused or renamed
projections alike. Channel ``j`` of the consumer's input then depends on row ``j`` of every
producer and on nothing else, so removing it means removing row ``j`` (and its bias) of each
producer and column ``j`` of the consumer, and the rest of the model computes exactly what it
computed with channel ``j``'s contribution set to zero.

Nothing here looks at module names: the walk starts at each Linear's input and goes back
through elementwise operators; it gives up (no group) at anything else -- a reshape (the
attention output), a norm, the residual stream, a parameter that is not a Linear's weight --
and when a value inside the group is also read outside it (removing a row would change that
reader too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.fx import Node

from graphprune.graph import queries as q

aten = torch.ops.aten

#: operators that act on each channel separately (the channel is the last dimension)
ELEMENTWISE = {
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.div.Scalar,
    aten.silu.default,
    aten.gelu.default,
    aten.relu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.dropout.default,
    aten.neg.default,
    aten.pow.Tensor_Scalar,
    aten.clamp.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.clone.default,
    aten.alias.default,
}


@dataclass
class ChannelGroup:
    """The input channels of ``consumer``, each tied to one output row of every producer."""

    consumer: q.LinearInfo
    producers: list[q.LinearInfo]
    block: int | None

    @property
    def name(self) -> str:
        return self.consumer.name

    @property
    def width(self) -> int:
        return self.consumer.in_features

    def params_per_channel(self) -> int:
        """Weights and biases one channel owns: a producer row (+ bias) each, a consumer column."""
        return sum(p.in_features + (1 if p.bias is not None else 0) for p in self.producers) + self.consumer.out_features

    def to_dict(self) -> dict[str, Any]:
        return {"consumer": self.consumer.name, "producers": [p.name for p in self.producers], "width": self.width, "block": self.block}


def _channel_region(start: Node, linears: dict[Node, q.LinearInfo], skip: Callable[[Node], Node]) -> tuple[set[Node], list[q.LinearInfo]] | None:
    """The elementwise nodes between ``start`` and the Linears it is computed from, or None."""
    region: set[Node] = set()
    producers: dict[Node, q.LinearInfo] = {}
    todo = [skip(start)]
    while todo:
        node = todo.pop()
        if node in region or node in producers:
            continue
        if node in linears:
            producers[node] = linears[node]
            continue
        if node.op != "call_function" or node.target not in ELEMENTWISE:
            return None
        region.add(node)
        for arg in node.args:
            if isinstance(arg, Node):
                todo.append(skip(arg))
            elif not isinstance(arg, (int, float, bool, torch.dtype, str)) and arg is not None:
                return None
    return region, list(producers.values())


def _through(skip: Callable[[Node], Node] | None) -> Callable[[Node], Node]:
    """Maps a node to the value it passes on unchanged: through dtype conversions and ``skip``
    (e.g. a calibration observer to its input), repeatedly."""
    see = skip or (lambda n: n)

    def through(node: Node) -> Node:
        while True:
            nxt = see(q.see_through(node))
            if nxt is node:
                return node
            node = nxt

    return through


def _private(node: Node, allowed: set[Node], through: Callable[[Node], Node]) -> bool:
    """Every reader of ``node`` is in ``allowed``, directly or through pass-through nodes."""
    for user in node.users:
        if user in allowed:
            continue
        if through(user) is not user and _private(user, allowed, through):
            continue
        return False
    return True


def find_channel_groups(gm: Any, skip: Callable[[Node], Node] | None = None) -> list[ChannelGroup]:
    """Every channel group of ``gm`` (a :class:`~graphprune.graph.model.GraphModel`), in graph order.

    ``skip`` maps a node to the value it passes through unchanged (e.g. a calibration
    observer to its input); dtype conversions are always seen through.
    """
    through = _through(skip)
    linears = {li.node: li for li in gm.linears}
    groups = []
    for consumer in gm.linears:
        if consumer.block is None:
            continue
        found = _channel_region(consumer.input, linears, through)
        if found is None:
            continue
        region, producers = found
        if not producers or any(p.out_features != consumer.in_features or p is consumer for p in producers):
            continue
        inside = region | {p.node for p in producers}
        # each value of the group may be read only by the group (observers count as the consumer)
        allowed = inside | {consumer.node}
        if all(_private(n, allowed, through) for n in inside):
            groups.append(ChannelGroup(consumer, producers, consumer.block))
    return groups


# --------------------------------------------------------------------------------------
# attention heads
# --------------------------------------------------------------------------------------

#: fused attention operators whose (query, key, value) are their first three arguments
ATTENTION_OPS = {aten.scaled_dot_product_attention.default}

#: operators that move or relabel a head tensor's elements without mixing heads
LAYOUT = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.cat.default,
}
_SHAPED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


@dataclass
class HeadGroup:
    """One attention: the heads of ``query``/``key``/``value`` (rows) and of ``consumer`` (columns).

    Query head ``h`` owns rows ``h*head_dim ...`` of the query projection and the same columns
    of the output projection; it reads KV head ``h // (heads // kv_heads)`` (grouped-query
    attention repeats each KV head for its group). ``edits`` are the graph's shape constants
    that spell a head count: ``(node, index in its shape list, what)`` with ``what`` one of
    ``q`` (query heads), ``kv`` (KV heads), ``rep`` (query heads per KV head), ``qd``
    (query heads x head_dim).
    """

    consumer: q.LinearInfo
    query: q.LinearInfo
    key: q.LinearInfo
    value: q.LinearInfo
    head_dim: int
    heads: int
    kv_heads: int
    block: int | None
    module: str
    edits: list[tuple[Node, int, str]]

    @property
    def name(self) -> str:
        return self.consumer.name

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads

    @property
    def producers(self) -> list[q.LinearInfo]:
        return [self.query, self.key, self.value]

    def _rows(self, li: q.LinearInfo) -> int:
        return self.head_dim * (li.in_features + (1 if li.bias is not None else 0))

    def params_per_query_head(self) -> int:
        """A query head: its query rows (+ bias) and its output-projection columns."""
        return self._rows(self.query) + self.head_dim * self.consumer.out_features

    def params_per_kv_group(self) -> int:
        """A KV group: its query heads, and its key and value rows (+ biases)."""
        return self.rep * self.params_per_query_head() + self._rows(self.key) + self._rows(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer.name,
            "producers": [p.name for p in self.producers],
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "block": self.block,
        }


def _shape(node: Node) -> tuple[str, ...] | None:
    val = node.meta.get("val")
    return tuple(str(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _head_path(start: Node, linears: dict[Node, q.LinearInfo], through: Callable[[Node], Node]) -> tuple[q.LinearInfo, list[Node]] | None:
    """The Linear a head tensor is computed from, and the nodes in between (graph order).

    Walks back through layout operators (following their first argument; every piece of a
    ``cat``) and elementwise ones (following only the arguments as large as the result:
    rotary embedding's broadcast cos/sin tables are not head tensors). None when the walk
    meets anything else or reaches more than one Linear.
    """
    region: list[Node] = []
    seen: set[Node] = set()
    found: set[Node] = set()
    todo = [through(start)]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in linears:
            found.add(node)
            continue
        if node.op != "call_function":
            return None
        region.append(node)
        if node.target is aten.cat.default:
            pieces = node.args[0]
            if not isinstance(pieces, (list, tuple)):
                return None
            todo.extend(through(a) for a in pieces if isinstance(a, Node))
        elif node.target in LAYOUT:
            if not isinstance(node.args[0], Node):
                return None
            todo.append(through(node.args[0]))
        elif node.target in ELEMENTWISE:
            full = [a for a in node.args if isinstance(a, Node) and _shape(a) == _shape(node)]
            if not full:
                return None
            todo.extend(through(a) for a in full)
        else:
            return None
    if len(found) != 1:
        return None
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return linears[found.pop()], sorted(region, key=order.__getitem__)


def _shape_edits(path: list[Node], role: str, head_dim: int) -> list[tuple[Node, int, str]] | None:
    """Where the shape constants along one head path spell a head count (see :class:`HeadGroup`).

    ``role`` is ``q`` (query path), ``kv`` (key/value path: ``kv`` heads until the grouped-
    query repeat, ``q`` after it) or ``o`` (attention output to the output projection).
    None when a constant cannot be placed (a layout this walk does not know)."""
    edits: list[tuple[Node, int, str]] = []
    heads = "kv" if role == "kv" else "q"
    for node in path:
        if node.target not in _SHAPED:
            continue
        shape = node.args[1]
        if not isinstance(shape, (list, tuple)):
            return None
        n = len(shape)
        for i, v in enumerate(shape):
            if not isinstance(v, int) or v == -1:
                continue
            if node.target is aten.expand.default and n == 5 and i in (1, 2):  # repeat of each KV head: [b, kv, rep, s, d]
                edits.append((node, i, "kv" if i == 1 else "rep"))
            elif i == n - 1 and v == head_dim:
                continue
            elif n == 4 and i in (1, 2):  # [b, s, heads, d] or [b, heads, s, d]
                edits.append((node, i, heads))
            elif n == 3 and i == 2:  # [b, s, heads * d]
                edits.append((node, i, "qd" if heads == "q" else "kvd"))
            elif v == 1:
                continue
            else:
                return None
        if node.target is aten.expand.default and n == 5:
            heads = "q"  # after the grouped-query repeat the key/value tensors have the query heads
    return edits


def find_head_groups(gm: Any, skip: Callable[[Node], Node] | None = None) -> list[HeadGroup]:
    """Every attention of ``gm`` whose heads can be removed, in graph order.

    An attention here is a fused attention operator (``scaled_dot_product_attention``) whose
    query, key and value each come from one Linear through layout and elementwise operators
    (head split, rotary embedding, the grouped-query repeat), and whose output reaches one
    Linear (the output projection) through layout operators only. Attentions written as
    explicit matmul/softmax, or whose head tensors pass through anything else (a norm over
    the head dimension), are not head groups.
    """
    through = _through(skip)
    linears = {li.node: li for li in gm.linears}
    groups = []
    for consumer in gm.linears:
        if consumer.block is None:
            continue
        # back from the output projection's input to the attention operator, through layout only
        node = through(consumer.input)
        o_path: list[Node] = []
        while node.op == "call_function" and node.target in LAYOUT and node.target is not aten.cat.default and isinstance(node.args[0], Node):
            o_path.append(node)
            node = through(node.args[0])
        if node.op != "call_function" or node.target not in ATTENTION_OPS or len(node.args) < 3:
            continue
        attention = node
        qv = attention.meta.get("val")
        if not isinstance(qv, torch.Tensor) or qv.dim() != 4:
            continue
        head_dim = int(qv.shape[-1])
        paths = [_head_path(a, linears, through) if isinstance(a, Node) else None for a in attention.args[:3]]
        if any(p is None for p in paths):
            continue
        (ql, qp), (kl, kp), (vl, vp) = paths  # type: ignore[misc]
        if len({ql.node, kl.node, vl.node, consumer.node}) != 4 or head_dim <= 0:
            continue
        if ql.out_features % head_dim or kl.out_features % head_dim or kl.out_features != vl.out_features:
            continue
        heads, kv_heads = ql.out_features // head_dim, kl.out_features // head_dim
        if heads % kv_heads or consumer.in_features != ql.out_features:
            continue
        edits = [_shape_edits(qp, "q", head_dim), _shape_edits(kp, "kv", head_dim), _shape_edits(vp, "kv", head_dim), _shape_edits(o_path[::-1], "o", head_dim)]
        if any(e is None for e in edits):
            continue
        # each projection's output may be read only inside its own path
        inside = set(qp) | set(kp) | set(vp) | {attention}
        if not all(_private(li.node, inside, through) for li in (ql, kl, vl)):
            continue
        names = [li.name.split(".") for li in (ql, kl, vl, consumer)]
        common = []
        for parts in zip(*names, strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        groups.append(HeadGroup(consumer, ql, kl, vl, head_dim, heads, kv_heads, consumer.block, ".".join(common), [e for es in edits for e in (es or [])]))
    return groups


__all__ = ["ATTENTION_OPS", "ELEMENTWISE", "LAYOUT", "ChannelGroup", "HeadGroup", "find_channel_groups", "find_head_groups"]
