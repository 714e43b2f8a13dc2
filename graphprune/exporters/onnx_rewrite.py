"""Graph rewrites on exported ONNX files that make them cheaper to run.

:func:`pack_shared_input_matmuls` merges ``MatMul`` nodes that read the same activation
with constant weights (an attention block's q/k/v projections, an MLP's gate and up
projections) into one ``MatMul`` on the concatenated weight, followed by a ``Split``.
The arithmetic is unchanged (each output column is the same dot product), but a decode
step with one token runs a third fewer matrix-vector products, each of which costs a
dispatch and a thread-pool round trip in onnxruntime. Widths may differ per layer (a
pruned or sliced model): each group is packed with its own split sizes.

Run it before quantization and sparse encoding: per-channel int8 scales are per output
column, so packing changes no quantized value, and a packed pruned weight stays sparse.

:func:`fuse_cached_attention` hands the KV cache to the ``Attention`` operator of opset 23.
torch's exporter writes attention with a cache as the module computes it: split the heads
(``Reshape`` + ``Transpose`` of q, k and v), rotate q and k, append k and v to the past
(``Concat``), repeat each key/value head for its group of query heads (``Unsqueeze`` +
``Expand`` + ``Reshape``, a copy of the whole cache every step), attend, and merge the
heads again. ``Attention`` does all of that itself when it is given the past keys and
values and the head counts (``q_num_heads`` / ``kv_num_heads``): the rewrite leaves one
``Attention`` and the two ``RotaryEmbedding`` nodes per layer, on 3-D ``(batch, seq,
heads * head_dim)`` tensors, and the cache is never repeated. The present keys and values
are the same tensors (``Attention`` concatenates past and new along the sequence), so the
file's interface does not change. Head counts come from each layer's own
``RotaryEmbedding`` nodes, so layers may have different numbers of heads.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: the ONNX opset generation files and logits files are written in: opset 23 gives
#: ``RMSNormalization``, ``RotaryEmbedding`` and ``Attention`` (with grouped-query heads),
#: which torch's exporter emits for these patterns and onnxruntime (>= 1.23) runs fused.
EXPORT_OPSET = 23


#: metadata key naming the modules a (possibly packed) MatMul computes, comma-separated
MODULES_KEY = "graphprune.modules"


def module_paths(node: onnx.NodeProto) -> list[str]:
    """The torch module paths a MatMul node computes, from the exporter's metadata
    (``pkg.torch.onnx.name_scopes``: ``[..., 'lm.model.layers.0.mlp.down_proj', 'linear_6']``)
    or, for a packed node, from :data:`MODULES_KEY`; ``[]`` when unknown."""
    props = {p.key: p.value for p in node.metadata_props}
    if MODULES_KEY in props:
        return [m for m in props[MODULES_KEY].split(",") if m]
    scopes = props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return []
    try:
        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return []
    return [str(parts[-2])] if isinstance(parts, list) and len(parts) >= 2 else []


@dataclass
class PackStats:
    groups: int = 0
    matmuls_before: int = 0
    matmuls_after: int = 0


def _uses(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            counts[name] += 1
    for out in graph.output:
        counts[out.name] += 1
    return counts


def _splice(graph: onnx.GraphProto, replace: dict[int, list[onnx.NodeProto]], drop: set[int]) -> None:
    """Rewrite ``graph.node`` in order: a node whose ``id`` is in ``replace`` becomes those
    nodes (at its place, so the graph stays topologically sorted), one in ``drop`` goes."""
    rebuilt: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in replace:
            rebuilt.extend(replace[id(node)])
        elif id(node) not in drop:
            rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(rebuilt)


def pack_shared_input_matmuls(model: onnx.ModelProto) -> PackStats:
    """Merge ``MatMul(x, W_i)`` nodes that share ``x`` into ``Split(MatMul(x, concat(W_i)))``, in place.

    Only 2-D float initializer weights used by nothing else are packed; the packed node
    takes the place of the group's first node, so the graph stays topologically sorted.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = _uses(graph)
    nodes_in = list(graph.node)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, node in enumerate(nodes_in):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or uses[node.input[1]] != 1:
            continue
        if weight.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            continue
        groups[node.input[0]].append(index)
    stats = PackStats(matmuls_before=sum(1 for n in graph.node if n.op_type == "MatMul"))
    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    dead: set[str] = set()
    for x, indices in groups.items():
        nodes = [nodes_in[i] for i in indices]
        arrays = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        if len(nodes) < 2 or len({a.shape[0] for a in arrays}) != 1 or len({a.dtype for a in arrays}) != 1:
            continue
        stats.groups += 1
        tag = f"__gp_packed/{nodes[0].name or nodes[0].output[0]}"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{tag}/weight"))
        graph.initializer.append(numpy_helper.from_array(np.array([a.shape[1] for a in arrays], dtype=np.int64), f"{tag}/split"))
        matmul = helper.make_node("MatMul", [x, f"{tag}/weight"], [f"{tag}/out"], name=f"{tag}/MatMul")
        entry = matmul.metadata_props.add()
        entry.key, entry.value = MODULES_KEY, ",".join(m for n in nodes for m in module_paths(n))
        packed = [
            matmul,
            helper.make_node("Split", [f"{tag}/out", f"{tag}/split"], [n.output[0] for n in nodes], name=f"{tag}/Split", axis=-1),
        ]
        replace[id(nodes[0])] = packed
        drop.update(id(n) for n in nodes[1:])
        dead.update(n.input[1] for n in nodes)
    if not stats.groups:
        stats.matmuls_after = stats.matmuls_before
        return stats
    _splice(graph, replace, drop)
    kept = [i for i in graph.initializer if i.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    stats.matmuls_after = sum(1 for n in graph.node if n.op_type == "MatMul")
    return stats


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass
class _Heads:
    """One of q/k/v on its way into attention: ``flat`` (batch, seq, heads*dim) became a
    (batch, heads, seq, dim) tensor through ``nodes``, rotated by ``rope`` when there is one."""

    flat: str
    nodes: list[onnx.NodeProto]
    rope: onnx.NodeProto | None = None


def fuse_cached_attention(model: onnx.ModelProto) -> int:
    """Give each cached ``Attention`` its past keys/values and 3-D inputs, in place (see the
    module docstring); returns the number of attention nodes rewritten.

    A layer is rewritten only when its whole pattern is there and no intermediate tensor is
    used outside it; anything else is left as exported (the file stays correct, only slower).
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}

    def made_by(name: str, op: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None

    def split_heads(name: str) -> _Heads | None:
        transpose = made_by(name, "Transpose")
        if transpose is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
            return None
        reshape = made_by(transpose.input[0], "Reshape")
        return None if reshape is None else _Heads(reshape.input[0], [transpose, reshape])

    def rotated_heads(name: str) -> _Heads | None:
        rope = made_by(name, "RotaryEmbedding")
        if rope is None or len(rope.input) != 3 or not _attr(rope, "num_heads"):
            return None
        heads = split_heads(rope.input[0])
        if heads is not None:
            heads.nodes.insert(0, rope)
            heads.rope = rope
        return heads

    def unrepeated(name: str) -> tuple[str, list[onnx.NodeProto]]:
        """``Reshape(Expand(Unsqueeze(t)))`` (grouped-query repeat) -> t; else the name itself."""
        reshape = made_by(name, "Reshape")
        expand = made_by(reshape.input[0], "Expand") if reshape is not None else None
        unsqueeze = made_by(expand.input[0], "Unsqueeze") if expand is not None else None
        if reshape is None or expand is None or unsqueeze is None:
            return name, []
        return unsqueeze.input[0], [reshape, expand, unsqueeze]

    def appended(name: str) -> onnx.NodeProto | None:
        concat = made_by(name, "Concat")
        return concat if concat is not None and len(concat.input) == 2 and _attr(concat, "axis") in (-2, 2) else None

    replace: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    for attention in list(graph.node):
        if attention.op_type != "Attention" or attention.domain not in ("", "ai.onnx") or len(attention.input) not in (3, 4):
            continue
        if len(attention.output) != 1:
            continue
        q4, k4, v4 = attention.input[:3]
        mask = attention.input[3] if len(attention.input) == 4 else ""
        key_all, key_repeat = unrepeated(k4)
        value_all, value_repeat = unrepeated(v4)
        key_cat, value_cat = appended(key_all), appended(value_all)
        if key_cat is None or value_cat is None:
            continue
        query, key, value = rotated_heads(q4), rotated_heads(key_cat.input[1]), split_heads(value_cat.input[1])
        if query is None or key is None or value is None:
            continue
        after = consumers[attention.output[0]]
        if len(after) != 1 or after[0].op_type != "Transpose" or list(_attr(after[0], "perm", [])) != [0, 2, 1, 3]:
            continue
        merge = consumers[after[0].output[0]]
        if len(merge) != 1 or merge[0].op_type != "Reshape":
            continue
        old = [attention, key_cat, value_cat, after[0], merge[0], *key_repeat, *value_repeat, *query.nodes, *key.nodes, *value.nodes]
        inside = {id(n) for n in old}
        # every tensor of the pattern is used inside it only; the merged heads keep their later
        # consumers and the present keys/values may be graph outputs, under the same names
        private = all(
            out == merge[0].output[0]
            or ((out not in graph_outputs or n in (key_cat, value_cat)) and all(id(c) in inside for c in consumers[out]))
            for n in old
            for out in n.output
        )
        if not private or any(id(n) in drop or id(n) in replace for n in old):
            continue
        assert query.rope is not None and key.rope is not None
        tag = f"__gp_attention/{attention.name or attention.output[0]}"
        q_heads, kv_heads = int(_attr(query.rope, "num_heads")), int(_attr(key.rope, "num_heads"))
        nodes = []
        for part, heads, which in ((query, q_heads, "q"), (key, kv_heads, "k")):
            assert part.rope is not None
            attrs = {a.name: helper.get_attribute_value(a) for a in part.rope.attribute}
            attrs["num_heads"] = heads
            rotated = f"{tag}/{which}"
            nodes.append(helper.make_node("RotaryEmbedding", [part.flat, *part.rope.input[1:]], [rotated], name=rotated, **attrs))
        attrs = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
        attrs.update(q_num_heads=q_heads, kv_num_heads=kv_heads)
        nodes.append(
            helper.make_node(
                "Attention",
                [f"{tag}/q", f"{tag}/k", value.flat, mask, key_cat.input[0], value_cat.input[0]],
                [merge[0].output[0], key_cat.output[0], value_cat.output[0]],
                name=tag,
                **attrs,
            )
        )
        replace[id(attention)] = nodes
        drop.update(id(n) for n in old if n is not attention)
    if not replace:
        return 0
    _splice(graph, replace, drop)
    return len(replace)


__all__ = ["EXPORT_OPSET", "MODULES_KEY", "PackStats", "fuse_cached_attention", "module_paths", "pack_shared_input_matmuls"]
