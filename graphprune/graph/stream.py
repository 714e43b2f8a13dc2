"""Residual-stream discovery: what rotations and slicing act on.

The residual stream is the value that runs from the embedding through every decoder
block to the final norm: each block *reads* it through a norm and *writes* back into it
with a residual add. Rotations and slicing act on it as one vector space, so they need
every weight on either side of it:

* **stream values**: the weakly connected component, in the dataflow graph (networkx),
  of the norm inputs through residual adds and shape-only operators (dtype conversion,
  view/reshape that keep the last axis, eval-mode dropout, alias);
* **embeddings**: ``aten.embedding`` lookups on a table that feed a stream value (tokens,
  and learned positions in OPT);
* **writers**: Linears whose output feeds a stream value (o_proj/down_proj, out_proj/fc2);
* **norms** and their **readers**: every Linear that reads a norm's output (q/k/v,
  gate/up, fc1, and the LM head behind the final norm);
* **direct reads**: Linears that read a stream value itself, with no norm in between
  (OLMo2 normalises a block's outputs, not its inputs: q/k/v read the stream). A rotation
  passes through them like through any reader (``x·Q · (W·Q)ᵀ = x·Wᵀ``); slicing cuts their
  columns without the norm's rescaling.

Anything else touching the stream (a norm output read by something other than a Linear,
an unknown operand of a residual add, any other operator reading it) raises a
:class:`~graphprune.errors.ConfigError` naming the node: rotating such a graph would be
silently wrong.

The weight surgery the stream passes then do lives in :mod:`graphprune.graph.edit`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import Node

from graphprune.errors import ConfigError
from graphprune.graph import queries as q
from graphprune.graph.model import GraphModel

aten = torch.ops.aten

#: the attribute of a post-norm's module holding the adapter Linear's weight that norm
#: folding puts behind it (``<norm>.adapter``)
ADAPTER_ATTR = "adapter"

#: Operators that carry the stream value unchanged along its last axis.
STREAM_OPS = frozenset(
    {
        aten.add.Tensor,  # the residual add
        aten.add_.Tensor,  # Falcon sums its parallel attention and MLP outputs in place
        aten.to.dtype,
        aten.to.dtype_layout,
        aten._to_copy.default,
        aten.clone.default,
        aten.alias.default,
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.dropout.default,  # eval mode: identity
    }
)
_SHAPE_ONLY = frozenset({aten.sym_size.int, aten._assert_tensor_metadata.default})
# ops inside a norm that read its input: RMSNorm's pow and x*rsqrt, LayerNorm itself
_NORM_READS = frozenset({aten.pow.Tensor_Scalar, aten.mul.Tensor, aten.layer_norm.default})


@dataclass
class StreamNorm:
    """A norm on the stream and the Linears that read its output."""

    norm: q.NormInfo
    readers: list[q.LinearInfo] = field(default_factory=list)
    #: MoE experts reading the norm's output (the tokens routed to each, gathered by row)
    experts: list[q.ExpertInfo] = field(default_factory=list)


@dataclass
class DirectRead:
    """A stream value read by Linears with no norm in between."""

    value: Node
    readers: list[q.LinearInfo] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A key for statistics (norms are keyed by their module path)."""
        return f"stream:{self.value.name}"

    @property
    def block(self) -> int | None:
        """The block of its first reader (the stage that reads it)."""
        return self.readers[0].block if self.readers else None


@dataclass
class StreamScale:
    """A constant factor between a stream writer and the stream, ``mul(source, c)``.

    Gemma scales its embeddings by ``sqrt(d)``, Granite its embeddings and every block's
    output by configured multipliers. :class:`~graphprune.passes.fold_norms.FoldNormsPass`
    folds each factor into the writer's weights before anything rotates the stream.

    Attributes:
        node: the multiplication.
        source: the embedding lookup or Linear it scales.
        factor: ``c``.
        buffer: the ``get_attr`` target holding ``c`` when it is a model buffer (set to 1
            after folding, so the model keeps computing what the graph computes), else None.
    """

    node: Node
    source: Node
    factor: float
    buffer: str | None


@dataclass
class ResidualStream:
    """Everything that reads or writes the residual stream of one graph.

    Attributes:
        width: the stream's width ``d`` (the embedding's columns).
        nodes: the stream values, in graph order.
        embeddings: ``(embedding node, table target)`` pairs writing the stream.
        writers: Linears whose output is added into the stream (``out_features == d``).
        norms: the norms reading the stream, each with its reader Linears.
        lm_head: the Linear computing the logits (a reader of the final norm).
        scales: constant factors between writers and the stream (none once norms are folded).
        post_norms: norms between a block's output and the stream (Gemma2's post-attention
            norm), or between the embedding and the stream (BLOOM's embedding LayerNorm);
            folding gives each an adapter Linear, which then writes the stream.
        normed_embeddings: ``(embedding node, table target)`` pairs that reach the stream
            only through such a norm (and its adapter): rotations leave their tables alone,
            but an LM head sharing one must be untied before it is rotated.
        direct: stream values read by Linears with no norm in between, in graph order.
        expert_writers: MoE experts whose outputs, weighted per token and summed over the
            experts each token was routed to, are added into the stream.
    """

    width: int
    nodes: list[Node]
    embeddings: list[tuple[Node, str]]
    writers: list[q.LinearInfo]
    norms: list[StreamNorm]
    lm_head: q.LinearInfo | None
    scales: list[StreamScale] = field(default_factory=list)
    post_norms: list[q.NormInfo] = field(default_factory=list)
    normed_embeddings: list[tuple[Node, str]] = field(default_factory=list)
    direct: list[DirectRead] = field(default_factory=list)
    expert_writers: list[q.ExpertInfo] = field(default_factory=list)

    @property
    def expert_readers(self) -> list[q.ExpertInfo]:
        return [e for sn in self.norms for e in sn.experts]

    @property
    def readers(self) -> list[q.LinearInfo]:
        """Every Linear reading the stream: behind a norm or directly."""
        return [li for sn in self.norms for li in sn.readers] + [li for dr in self.direct for li in dr.readers]

    @property
    def final_norm(self) -> StreamNorm | None:
        """The norm in front of the LM head."""
        if self.lm_head is None:
            return None
        return next((sn for sn in self.norms if any(li.node is self.lm_head.node for li in sn.readers)), None)

    @property
    def kinds(self) -> set[str]:
        return {sn.norm.kind for sn in self.norms}


def _through(node: Node) -> Node:
    """Follow conversions and aliases back to the value they carry."""
    while node.op == "call_function" and node.target in q._TRANSPARENT and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _rank(node: Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


_RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})


def _keeps_last_axis(node: Node) -> bool:
    """A view/reshape that leaves the last axis as it is (GPT-2 flattens tokens before its LM head)."""
    if node.target not in _RESHAPES or not isinstance(node.args[0], Node):
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() > 0 and out.dim() > 0 and src.shape[-1] == out.shape[-1]


def _reshaped(node: Node) -> Node:
    """Follow conversions and last-axis-keeping reshapes back to the value they carry."""
    while isinstance(node, Node) and node.op == "call_function" and (node.target in q._TRANSPARENT or _keeps_last_axis(node)):
        node = node.args[0]  # type: ignore[assignment]
    return node


def _is_tensor(node: Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor) or node.op == "get_attr"


def _constant(gm: GraphModel, arg: object) -> tuple[float, str | None] | None:
    """``(value, buffer target or None)`` when ``arg`` is a number or a one-element attribute."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg), None
    if isinstance(arg, Node):
        node = _through(arg)
        if node.op == "get_attr":
            value = gm.get_attr(node.target)  # type: ignore[arg-type]
            if value.numel() == 1:
                return float(value), node.target  # type: ignore[return-value]
    return None


def _scaled(gm: GraphModel, node: Node) -> tuple[Node, float, str | None] | None:
    """``(x, c, buffer)`` when ``node`` is ``x * c`` with ``c`` a constant."""
    if node.op != "call_function" or node.target not in (aten.mul.Tensor, aten.mul.Scalar) or len(node.args) != 2:
        return None
    for a, b in (node.args, node.args[::-1]):
        const = _constant(gm, b)
        if const is not None and isinstance(a, Node):
            return _through(a), const[0], const[1]
    return None


def _is_lookup(node: Node) -> bool:
    return node.target is aten.embedding.default and isinstance(node.args[0], Node) and node.args[0].op == "get_attr"


def _from_embedding(gm: GraphModel, node: Node) -> bool:
    """``node`` is an embedding lookup, or one times a constant (seen through conversions)."""
    node = _through(node)
    scaled = _scaled(gm, node)
    return _is_lookup(_through(scaled[0]) if scaled else node)


def _is_adapter(node: Node) -> bool:
    """``node`` is the Linear norm folding put behind a post-norm (its weight is an adapter)."""
    return node.target is aten.linear.default and str(getattr(node.args[1], "target", "")).endswith(f".{ADAPTER_ATTR}")


def _embedding_norm(gm: GraphModel, node: Node) -> q.NormInfo | None:
    """The norm of an embedding lookup that ``node`` is, directly or as the output of its
    adapter Linear (BLOOM normalises the embedding before the first block), else None."""
    node = _through(node)
    if _is_adapter(node):
        node = _through(node.args[0])  # type: ignore[arg-type]
    return next((ni for ni in gm.norms if ni.output is node and _from_embedding(gm, ni.input)), None)


def _row_gather(node: Node) -> bool:
    """``x[rows]``: an index on the first axis only, of a value with a last axis to keep."""
    indices = node.args[1] if len(node.args) > 1 else None
    rank = _rank(node.args[0]) if isinstance(node.args[0], Node) else None
    return node.target is aten.index.Tensor and isinstance(indices, (list, tuple)) and len(indices) == 1 and (rank or 0) >= 2


def _routed_sources(node: Node, writers: set[Node]) -> list[Node] | None:
    """The writers (Linears, grouped expert products) whose outputs ``node`` combines by
    operations on whole rows only -- a per-token weight (``x·g`` with ``g [..., 1]``), a
    gather or a sum over tokens, reshapes that keep the last axis, sums of such values --
    which is how an MoE block adds its experts' outputs into the stream. None when anything
    else is on the way."""
    found: list[Node] = []
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in writers:
            found.append(n)
            continue
        if n.op != "call_function":
            return None
        val = n.meta.get("val")
        if n.target in q._TRANSPARENT or _keeps_last_axis(n) or _row_gather(n):
            todo.append(n.args[0])  # type: ignore[arg-type]
        elif n.target is aten.sum.dim_IntList and isinstance(val, torch.Tensor) and val.dim() > 0:
            rank = _rank(n.args[0])  # type: ignore[arg-type]
            if rank is None or any(int(d) % rank == rank - 1 for d in n.args[1]):  # type: ignore[union-attr, arg-type]
                return None  # a sum over the features mixes them
            todo.append(n.args[0])  # type: ignore[arg-type]
        elif n.target is aten.mul.Tensor and len(n.args) == 2 and all(isinstance(a, Node) for a in n.args):
            a, b = n.args
            weights = [x for x in (a, b) if isinstance(x.meta.get("val"), torch.Tensor) and x.meta["val"].shape[-1] == 1]  # type: ignore[union-attr]
            if len(weights) != 1:
                return None
            todo.append(b if weights[0] is a else a)  # type: ignore[arg-type]
        elif n.target in (aten.add.Tensor, aten.add_.Tensor) and len(n.args) == 2 and all(isinstance(a, Node) for a in n.args):
            todo.extend(n.args)  # type: ignore[arg-type]
        else:
            return None
    return found


def find_stream(gm: GraphModel) -> ResidualStream:
    """Discover the residual stream of ``gm``'s graph (see the module docstring).

    Raises:
        ConfigError: the graph has no norms, or something reads or writes the stream in a
            way a rotation cannot pass through (the message names the node).
    """
    norms = gm.norms
    if not norms:
        raise ConfigError(f"{gm.name}: no RMSNorm/LayerNorm found; rotations need a pre-norm decoder.")
    graph = gm.gm.graph
    by_name = {n.name: n for n in graph.nodes}
    dataflow = gm.networkx()
    # stream values are [batch, seq, d] (or flattened [tokens, d]): a conversion of a scalar is not one
    candidates = {n.name for n in graph.nodes if n.op == "call_function" and n.target in STREAM_OPS and _rank(n) != 0}
    # a norm on a Linear's output (OLMo2's q/k norms) must not join the Linear's input to the stream
    # (an adapter Linear is a stream writer, and BLOOM's first block norms its output)
    candidates |= {ni.input.name for ni in norms if ni.input.target is not aten.linear.default or _is_adapter(ni.input)}
    # a norm of the embedding that another norm reads, directly or through its adapter (BLOOM),
    # starts the stream: its input is not on it
    for ni in norms:
        start = _embedding_norm(gm, ni.input)
        if start is not None:
            candidates.discard(start.input.name)
    view = dataflow.subgraph(candidates)
    starts = {ni.input.name for ni in norms}
    members: set[str] = set()
    for comp in nx.weakly_connected_components(view):
        # the stream is what the embedding starts: a norm inside attention (q/k norms) is not on it
        touches = any(
            _from_embedding(gm, by_name[m]) or _embedding_norm(gm, by_name[m]) is not None
            or any(_from_embedding(gm, i) or _embedding_norm(gm, i) is not None for i in by_name[m].all_input_nodes)
            for m in comp
        )
        if comp & starts and touches:
            members |= comp
    norms = [ni for ni in norms if ni.input.name in members]
    if not norms:
        raise ConfigError(f"{gm.name}: no norm reads the residual stream that starts at the embedding; rotations need a pre-norm decoder.")
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted((by_name[n] for n in members), key=order.__getitem__)

    linears = {li.node: li for li in gm.linears}
    experts: dict[Node, list[q.ExpertInfo]] = {}
    for e in gm.experts:
        experts.setdefault(e.node, []).append(e)
    writer_nodes = set(linears) | set(experts)  # what can write the stream behind row operations
    writers: list[q.LinearInfo] = []
    expert_writers: list[q.ExpertInfo] = []
    embeddings: list[tuple[Node, str]] = []

    scales: list[StreamScale] = []
    post_norms: list[q.NormInfo] = []
    norm_outputs = {ni.output: ni for ni in gm.norms if ni.input.name not in members}

    normed: list[tuple[Node, str]] = []

    def source(src: Node, into: Node) -> None:
        src = _through(src)  # a converted writer output (Gemma2 casts its post-norm output back)
        start = _embedding_norm(gm, src)
        if start is not None:
            lookup = _through(start.input)
            scaled = _scaled(gm, lookup)
            lookup = _through(scaled[0]) if scaled else lookup
            if all(e is not lookup for e, _ in normed):
                normed.append((lookup, str(lookup.args[0].target)))  # type: ignore[union-attr]
        post = norm_outputs.get(src)
        if post is not None:
            if all(p is not post for p in post_norms):
                post_norms.append(post)
            return
        scaled = _scaled(gm, src)
        if scaled is not None and (scaled[0] in linears or _is_lookup(scaled[0])):
            scales.append(StreamScale(src, scaled[0], scaled[1], scaled[2]))
            source(scaled[0], src)
            return
        if src in linears:
            if all(w.node is not src for w in writers):
                writers.append(linears[src])
        elif _is_lookup(src):
            if all(e is not src for e, _ in embeddings):
                embeddings.append((src, str(src.args[0].target)))  # type: ignore[union-attr]
        elif (routed := _routed_sources(src, writer_nodes)) is not None:
            for n in routed:  # an MoE block: its experts (and a shared expert) write the stream
                if n in linears:
                    if all(w.node is not n for w in writers):
                        writers.append(linears[n])
                elif all(e.node is not n for e in expert_writers):
                    expert_writers.extend(experts[n])
        else:
            raise ConfigError(
                f"{gm.name}: {src.format_node()} ({q.module_path(src) or 'no module'}) feeds the residual stream "
                f"at {into.name} but is neither a Linear nor an embedding; this architecture cannot be rotated."
            )

    for node in nodes:
        if node.target not in STREAM_OPS:  # a norm input that is itself a source (the first embedding)
            source(node, node)
            continue
        for src in node.all_input_nodes:
            if src.name not in members and _is_tensor(src):
                source(src, node)
    if not embeddings and not normed:
        raise ConfigError(f"{gm.name}: no embedding lookup writes the residual stream; cannot rotate it.")
    if embeddings:
        width = int(gm.get_attr(embeddings[0][1]).shape[1])
    else:  # a normed embedding starts the stream: its adapter (sliced with the stream) or its table
        adapter = next((li for li in writers if _is_adapter(li.node)), None)
        width = adapter.out_features if adapter is not None else int(gm.get_attr(normed[0][1]).shape[1])
    for name, out in [(li.name, li.out_features) for li in writers] + [(e.name, e.out_features) for e in expert_writers]:
        if out != width:
            raise ConfigError(f"{name} writes the stream with {out} outputs, but the stream is {width} wide.")

    stream_norms: list[StreamNorm] = []
    reader_nodes: set[Node] = set()
    for ni in norms:
        sn = StreamNorm(ni)
        frontier = list(ni.output.users)
        walked = {ni.output}  # the norm's output and what carries its rows on (the tokens routed to experts)
        while frontier:
            user = frontier.pop()
            if user in linears and _reshaped(user.args[0]) is ni.output:  # type: ignore[arg-type]
                sn.readers.append(linears[user])
                reader_nodes.add(user)
            elif user in experts and _reshaped(user.args[0]) in walked:  # type: ignore[arg-type]
                if all(e.node is not user for e in sn.experts):
                    sn.experts.extend(experts[user])
            elif user.op == "call_function" and (user.target in q._TRANSPARENT or _keeps_last_axis(user) or _row_gather(user)):
                walked.add(user)
                frontier.extend(user.users)
            elif user.op == "call_function" and user.target in _SHAPE_ONLY:
                continue
            else:
                raise ConfigError(
                    f"{gm.name}: the output of norm {ni.name} is read by {user.format_node()}, which is not a Linear; "
                    "rotations need every norm output to feed Linears only."
                )
        sn.readers.sort(key=lambda li: order[li.node])
        stream_norms.append(sn)

    internals = {n for ni in norms for n in ni.internals}
    direct: dict[Node, DirectRead] = {}
    for node in nodes + [e for e, _ in embeddings]:  # an embedding's own output may be read too
        for user in node.users:
            if user in linears and user not in reader_nodes and user.args[0] is node:
                direct.setdefault(node, DirectRead(node)).readers.append(linears[user])
                continue
            if node.op == "call_function" and node.target is aten.embedding.default:
                continue  # its other users are stream operators, checked above
            if user.name in members or user.op == "output" or user in internals:
                continue
            if user.op == "call_function" and (user.target in _SHAPE_ONLY or user.target in _NORM_READS):
                continue
            if user.target is aten.type_as.default and user.args[0] is not node:
                continue  # read for its dtype only (Gemma's norms cast their output like their input)
            raise ConfigError(
                f"{gm.name}: stream value {node.name} is read by {user.format_node()} "
                f"({q.module_path(user) or 'no module'}) outside a norm; this architecture cannot be rotated."
            )
    reads = sorted(direct.values(), key=lambda dr: order[dr.readers[0].node])
    return ResidualStream(width, nodes, embeddings, writers, stream_norms, gm.lm_head, scales, post_norms, normed, reads, expert_writers)


# ---------------------------------------------------------------------------- weight surgery
