"""int8 weights on top of pruning, with onnxruntime's own quantization tools.

:func:`quantize_int8` rewrites an exported ONNX file with dynamic quantization
(``onnxruntime.quantization.quantize_dynamic``): every ``MatMul`` whose second input is a
constant weight gets int8 weights, one symmetric scale per output channel, and its
activations are quantized to uint8 at run time (``DynamicQuantizeLinear`` +
``MatMulInteger``; onnxruntime fuses them into one op). Attention's activation-by-activation
products stay float32.

Before quantizing, weights that reach a ``MatMul`` through a ``Transpose`` of a constant are
materialised as their own initializer, so a tied LM head (``logits = h @ embedding.T``), the
largest matrix of a small model, is quantized too; the embedding lookup keeps its float32
table.

The MLP's output projections stay float32 by default (:data:`KEEP_FLOAT`, globs on the
torch module path the exporter records on each node): their input, the gated activation,
has outliers that one uint8 scale per tensor clips. On the default model that decides the
quality: perplexity 19.43 with every projection in int8, 11.92 with the down projections in
float32 (float32 file: 11.22).

A pruned weight stays exactly zero (symmetric quantization: zero maps to the integer 0), so
int8 and sparse initializers compose: :func:`graphprune.exporters.onnx_sparse.sparsify_initializers`
then packs the int8 tensors (``numel/8 + nnz`` bytes) for the smallest file.

The int8 file cannot match PyTorch to float tolerance; exporters check it against the float
file's outputs with a relative tolerance (:data:`INT8_RTOL`) and report the agreement, and its
quality is measured by perplexity (``graphprune eval --model FILE.onnx``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)
#: largest accepted ||logits_int8 - logits_float|| / ||logits_float|| on the export's probes.
#: A guard against a broken file, not a quality bar (perplexity is): 1.0 is as far from the
#: float32 logits as all-zero logits would be. On random-token probes healthy files stay well
#: below (default model ~0.2, its PCA-sliced variant ~0.6, the tiny test models ~0.04); a
#: wrong scale or axis lands above.
INT8_RTOL = 1.0
#: module paths whose MatMuls stay float32: the MLP output projection under its usual names
KEEP_FLOAT: tuple[str, ...] = ("*.down_proj", "*.mlp.fc2", "*.fc2", "*.mlp.c_proj", "*.dense_4h_to_h", "*.w2")


@dataclass
class QuantizeStats:
    """What :func:`quantize_int8` did."""

    quantized_matmuls: int
    float_matmuls: int
    kept_float: int
    materialised_transposes: int
    bytes_before: int
    bytes_after: int
    seconds: float


def check_quantize(mode: str | None, format: str) -> None:
    """Fail early (before any export work) on an unknown mode or a format that cannot take it."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"unknown quantization {mode!r}; choose from {list(QUANTIZE_MODES)}.")
    if format != "onnx":
        raise ConfigError(
            f"--quantize {mode} uses onnxruntime's quantization tools and needs --format onnx, got --format {format}."
        )


def _materialise_transposed_weights(model: onnx.ModelProto) -> int:
    """``MatMul(x, Transpose(W))`` with ``W`` an initializer -> ``MatMul(x, W_t)`` with a new
    initializer ``W_t``, so the quantizer sees a constant weight. Returns how many were rewritten."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    done = 0
    dead: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        src = producers.get(node.input[1])
        if src is None or src.op_type != "Transpose" or src.input[0] not in inits:
            continue
        weight = numpy_helper.to_array(inits[src.input[0]])
        perm = next((list(a.ints) for a in src.attribute if a.name == "perm"), None)
        transposed = np.ascontiguousarray(np.transpose(weight, perm) if perm else weight.T)
        name = f"{src.input[0]}__transposed"
        if name not in inits:
            tensor = numpy_helper.from_array(transposed, name)
            graph.initializer.append(tensor)
            inits[name] = tensor
        old = node.input[1]
        node.input[1] = name
        consumers[old] -= 1
        if consumers[old] == 0 and old not in outputs:
            dead.append(src)
        done += 1
    for node in dead:
        graph.node.remove(node)
    return done


def _op_count(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def _kept_float(model: onnx.ModelProto, globs: tuple[str, ...]) -> list[str]:
    """Names of the MatMul nodes computing a module that matches one of ``globs``."""
    from fnmatch import fnmatchcase

    from graphprune.exporters.onnx_rewrite import module_paths

    names = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul":
            continue
        if any(fnmatchcase(path, g) for path in module_paths(node) for g in globs):
            if not node.name:
                node.name = f"__gp_matmul_{index}"
            names.append(node.name)
    return names


def quantize_int8(src: str | Path, dst: str | Path, keep_float: tuple[str, ...] = KEEP_FLOAT) -> QuantizeStats:
    """Write an int8 (dynamic, per-channel weights) copy of the ONNX file ``src`` to ``dst``;
    MatMuls of modules matching ``keep_float`` (globs on module paths) stay float32.

    ``src`` must hold its tensors in the file (below the 2 GB protobuf limit); the result
    is written as one file. Raises :class:`ExportError` if onnxruntime's quantizer fails or
    quantizes nothing.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        raise ExportError(f"{src} keeps its weights in an external data file; int8 quantization supports single-file models (< 2 GB).")
    transposes = _materialise_transposed_weights(model)
    excluded = _kept_float(model, keep_float)
    before = src.stat().st_size
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on the root logger
    try:
        quantize_dynamic(
            model,
            dst,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True},
        )
    except Exception as exc:  # the quantizer raises assorted types; all mean "could not quantize"
        raise ExportError(f"onnxruntime's quantize_dynamic failed on {src.name}: {type(exc).__name__}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    out = onnx.load(str(dst))
    quantized = _op_count(out, "MatMulInteger") + _op_count(out, "DynamicQuantizeMatMul")
    if quantized == 0:
        raise ExportError(f"onnxruntime's quantizer found no MatMul with a constant weight in {src.name}; nothing was quantized.")
    stats = QuantizeStats(
        quantized_matmuls=quantized,
        float_matmuls=_op_count(out, "MatMul"),
        kept_float=len(excluded),
        materialised_transposes=transposes,
        bytes_before=before,
        bytes_after=dst.stat().st_size,
        seconds=time.perf_counter() - start,
    )
    log.info(
        "int8: %d MatMuls quantized (%d stay float, %d of them by keep_float), %d transposed weights materialised; %d -> %d bytes",
        stats.quantized_matmuls,
        stats.float_matmuls,
        stats.kept_float,
        transposes,
        before,
        stats.bytes_after,
    )
    return stats


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """``||got - ref|| / ||ref||`` over all elements (inf when ``ref`` is zero)."""
    denom = float(np.linalg.norm(ref))
    return float(np.linalg.norm(got - ref)) / denom if denom > 0 else float("inf")


def check_relative(err: float, rtol: float, what: str) -> None:
    if not err <= rtol:  # NaN fails too
        raise ExportError(
            f"the int8 {what} differ from the float32 file's by a relative {err:.3g} (> {rtol:g}); "
            "the file was not written. Quantization went wrong for this model: export without --quantize."
        )


__all__ = ["INT8_RTOL", "KEEP_FLOAT", "QUANTIZE_MODES", "QuantizeStats", "check_quantize", "check_relative", "quantize_int8", "relative_error"]
