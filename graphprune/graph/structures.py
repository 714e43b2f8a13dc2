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
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.div.Scalar,
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
    aten.dropout.default, aten.neg.default, aten.pow.Tensor_Scalar, aten.clamp.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.alias.default,
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
    see = skip or (lambda n: n)

    def through(node: Node) -> Node:
        while True:
            nxt = see(q.see_through(node))
            if nxt is node:
                return node
            node = nxt

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


__all__ = ["ELEMENTWISE", "ChannelGroup", "find_channel_groups"]
