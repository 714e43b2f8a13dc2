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
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass

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
        replace[indices[0]] = packed
        drop.update(indices[1:])
        dead.update(n.input[1] for n in nodes)
    if not stats.groups:
        stats.matmuls_after = stats.matmuls_before
        return stats
    rebuilt: list[onnx.NodeProto] = []
    for index, node in enumerate(nodes_in):
        if index in replace:
            rebuilt.extend(replace[index])
        elif index not in drop:
            rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(rebuilt)
    kept = [i for i in graph.initializer if i.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    stats.matmuls_after = sum(1 for n in graph.node if n.op_type == "MatMul")
    return stats


__all__ = ["EXPORT_OPSET", "MODULES_KEY", "PackStats", "module_paths", "pack_shared_input_matmuls"]
