"""Store mostly-zero ONNX initializers compactly, in one of two encodings.

1. ``coo`` -- an ONNX ``SparseTensorProto`` in ``graph.sparse_initializer`` (values plus
   linearised indices). The ONNX checker requires **int64** indices, so each nonzero
   costs ``itemsize + 8`` bytes: for float32 that only shrinks a tensor below ~1/3
   density, and a 50 % (2:4) weight would *grow* by half. onnxruntime densifies these
   at load time. Caveat: ``onnx.checker.check_model(full_check=True)`` rejects a sparse
   initializer consumed by an op ("unsupported type: sparse_tensor"), so models using
   it are checked without ``full_check``.
2. ``bitmask`` -- the keep-mask packed 8 per byte (uint8) plus the nonzero values, and a
   9-node decode subgraph of standard ops (BitShift, Mod, CumSum, Gather, ...) that
   rebuilds the dense tensor under the initializer's original name. It costs
   ``numel/8 + nnz*itemsize`` bytes: ~53 % of dense at 50 % sparsity in float32. All its
   inputs are constants, so onnxruntime's constant folding rebuilds the weight once at
   session creation and inference runs the original dense graph.

``mode="auto"`` picks, per tensor, whichever is smallest (dense included). Float tensors and
the int8 weight matrices of a quantized file (:mod:`.quantize`; a pruned weight stays 0 there)
are candidates: an int8 weight at 50 % sparsity packs to ~0.63 of its bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import ExportError

MODES = ("auto", "coo", "bitmask")
#: tensors smaller than this stay dense (the decode nodes would cost more than they save).
MIN_ELEMENTS = 1024
#: a tensor is re-encoded only if that saves at least this fraction of its bytes.
MIN_SAVING = 0.1

_PREFIX = "__gp_sparse"


@dataclass
class SparseEncodingStats:
    coo: int = 0
    bitmask: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


def _coo_bytes(nnz: int, itemsize: int) -> int:
    return nnz * (itemsize + 8)


def _bitmask_bytes(numel: int, nnz: int, itemsize: int) -> int:
    return math.ceil(numel / 8) + (nnz + 1) * itemsize + 64


def _shared_constants(graph: onnx.GraphProto) -> None:
    consts: dict[str, np.ndarray] = {
        f"{_PREFIX}_shifts": np.arange(8, dtype=np.uint8),
        f"{_PREFIX}_two": np.array(2, dtype=np.uint8),
        f"{_PREFIX}_last_axis": np.array([-1], dtype=np.int64),
        f"{_PREFIX}_flat": np.array([-1], dtype=np.int64),
        f"{_PREFIX}_zero": np.array([0], dtype=np.int64),
        f"{_PREFIX}_axis0": np.array(0, dtype=np.int64),
    }
    for name, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(value, name))


def _bitmask_nodes(name: str, array: np.ndarray, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Replace initializer ``name`` by packed mask + values and return the decode nodes."""
    flat = array.reshape(-1)
    keep = flat != 0
    values = np.concatenate([np.zeros(1, dtype=flat.dtype), flat[keep]])  # slot 0 = the zero
    p = f"{_PREFIX}/{name}"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.packbits(keep, bitorder="little"), f"{p}/mask"),
            numpy_helper.from_array(values, f"{p}/values"),
            numpy_helper.from_array(np.array([flat.size], dtype=np.int64), f"{p}/numel"),
            numpy_helper.from_array(np.array(array.shape, dtype=np.int64), f"{p}/shape"),
        ]
    )
    c = _PREFIX
    return [
        helper.make_node("Unsqueeze", [f"{p}/mask", f"{c}_last_axis"], [f"{p}/bytes"]),
        helper.make_node("BitShift", [f"{p}/bytes", f"{c}_shifts"], [f"{p}/shifted"], direction="RIGHT"),
        helper.make_node("Mod", [f"{p}/shifted", f"{c}_two"], [f"{p}/bits"]),
        helper.make_node("Reshape", [f"{p}/bits", f"{c}_flat"], [f"{p}/bits_flat"]),
        helper.make_node("Slice", [f"{p}/bits_flat", f"{c}_zero", f"{p}/numel"], [f"{p}/keep_u8"]),
        helper.make_node("Cast", [f"{p}/keep_u8"], [f"{p}/keep"], to=TensorProto.INT64),
        helper.make_node("CumSum", [f"{p}/keep", f"{c}_axis0"], [f"{p}/rank"]),
        # rank * keep: the k-th kept weight reads values[k], every pruned one values[0] == 0
        helper.make_node("Mul", [f"{p}/rank", f"{p}/keep"], [f"{p}/index"]),
        helper.make_node("Gather", [f"{p}/values", f"{p}/index"], [f"{p}/dense_flat"], axis=0),
        helper.make_node("Reshape", [f"{p}/dense_flat", f"{p}/shape"], [name]),
    ]


def _coo(name: str, array: np.ndarray) -> onnx.SparseTensorProto:
    flat = array.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[idx], name)
    indices = numpy_helper.from_array(idx, f"{name}/indices")
    return helper.make_sparse_tensor(values, indices, list(array.shape))


def _is_weight(array: np.ndarray) -> bool:
    """Float tensors, and the int8 weight matrices of a quantized model (not its 1-D zero points)."""
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":  # bfloat16 comes from ml_dtypes
        return True
    return array.dtype == np.int8 and array.ndim >= 2


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def sparsify_initializers(
    model: onnx.ModelProto,
    mode: str = "auto",
    *,
    min_elements: int = MIN_ELEMENTS,
    min_saving: float = MIN_SAVING,
) -> SparseEncodingStats:
    """Re-encode the mostly-zero float (and int8 weight) initializers of ``model`` in place.

    Args:
        model: an ONNX model whose initializers hold their data in the proto.
        mode: ``"auto"`` (smallest per tensor), ``"coo"`` (SparseTensorProto only) or
            ``"bitmask"`` (packed mask + decode ops only).
        min_elements: smaller tensors are left dense.
        min_saving: minimum fraction of a tensor's bytes an encoding must save.

    Returns:
        How many tensors went to each encoding and the raw tensor bytes before/after.
    """
    if mode not in MODES:
        raise ExportError(f"unknown sparse initializer mode {mode!r}; choose from {MODES} (True means 'auto').")
    if mode != "coo" and _opset(model) < 14:
        raise ExportError(
            f"the bitmask encoding needs ONNX opset >= 14, the model has {_opset(model)}; use mode='coo'."
        )
    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    stats = SparseEncodingStats()
    keep: list[TensorProto] = []
    decode: list[onnx.NodeProto] = []
    for init in list(graph.initializer):
        if init.name in graph_inputs or init.data_location == TensorProto.EXTERNAL:
            keep.append(init)
            continue
        array = numpy_helper.to_array(init)
        if array.size < min_elements or not _is_weight(array):
            keep.append(init)
            continue
        itemsize = array.dtype.itemsize
        dense = array.size * itemsize
        nnz = int(np.count_nonzero(array))
        sizes = {"dense": dense * (1 - min_saving)}
        if mode in ("auto", "coo"):
            sizes["coo"] = _coo_bytes(nnz, itemsize)
        if mode in ("auto", "bitmask") and nnz > 0:
            sizes["bitmask"] = _bitmask_bytes(array.size, nnz, itemsize)
        best = min(sizes, key=lambda k: sizes[k])
        stats.bytes_before += dense
        if best == "coo":
            graph.sparse_initializer.append(_coo(init.name, array))
            stats.coo += 1
            stats.bytes_after += _coo_bytes(nnz, itemsize)
        elif best == "bitmask":
            decode.extend(_bitmask_nodes(init.name, array, graph))
            stats.bitmask += 1
            stats.bytes_after += _bitmask_bytes(array.size, nnz, itemsize)
        else:
            keep.append(init)
            stats.bytes_after += dense
    if stats.coo or stats.bitmask:
        new_inits = [i for i in graph.initializer if i.name.startswith(_PREFIX)]
        del graph.initializer[:]
        graph.initializer.extend(keep + new_inits)
        if decode:
            _shared_constants(graph)
            nodes = list(graph.node)
            del graph.node[:]
            graph.node.extend(decode + nodes)  # decoders first: the graph stays topologically sorted
    return stats
