"""Export a causal LM to ONNX (``input_ids -> logits``) and prove onnxruntime agrees.

Steps:
1. Wrap the model as :class:`~graphprune.exporters.common.LogitsOnly` (no KV cache),
   lower sparse kernels to dense ``nn.Linear`` for the duration (ONNX has no sparse
   matmul), and export with ``torch.onnx.export(..., dynamo=True)`` with dynamic
   ``batch`` and ``seq`` axes; the Linears that read one activation are packed into one
   ``MatMul`` (:mod:`.onnx_rewrite`).
2. Optionally re-encode mostly-zero initializers (:mod:`.onnx_sparse`).
3. Save into a staging folder next to the target: one file when the model is below
   the 2 GB protobuf limit, else the model plus one ``<name>.data`` external file.
4. ``onnx.checker`` (``full_check`` unless COO sparse initializers are present: the
   checker's shape inference rejects them), then onnxruntime (CPUExecutionProvider)
   on two probe batches of different batch size and length, compared with the
   PyTorch logits of the *unlowered* model (so kernel lowering is verified too).
5. Only then rename into place (:func:`graphprune.fileio.publish`). Any failure leaves no
   file behind; a full disk or a missing permission ends as one ``OutputError``.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from graphprune.errors import ExportError
from graphprune.exporters.common import (
    ExportReport,
    LogitsOnly,
    check_diff,
    eval_mode,
    example_inputs,
    ort_session,
    probe_inputs,
    reference_logits,
    require_cpu,
)
from graphprune.exporters.onnx_ops import translation_table
from graphprune.exporters.onnx_rewrite import pack_shared_input_matmuls
from graphprune.exporters.onnx_sparse import sparsify_initializers
from graphprune.exporters.quantize import INT8_RTOL, check_quantize, check_relative, quantize_int8, relative_error
from graphprune.fileio import publish, staging_dir
from graphprune.kernels import kernels_lowered

log = logging.getLogger(__name__)

#: protobuf cannot serialise a message of 2 GiB; stay well below it.
SINGLE_FILE_LIMIT = 1_800_000_000


def _torch_export(model: nn.Module, example: Tensor, optimize: bool = True) -> onnx.ModelProto:
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq")
    wrapper = LogitsOnly(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter from torch.export / transformers
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                custom_translation_table=translation_table(),
                optimize=optimize,
                verbose=False,
            )
    except Exception as exc:  # torch raises many types here; all mean "could not export"
        raise ExportError(
            f"torch.onnx.export (dynamo) failed for {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program.")
    return program.model_proto


def _run_onnxruntime(path: Path, inputs: list[Tensor]) -> list[np.ndarray]:
    try:
        session = ort_session(path)
        return [session.run(["logits"], {"input_ids": ids.numpy()})[0] for ids in inputs]
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"onnxruntime could not run the exported model: {exc}") from exc


def _max_diff(outputs: list[np.ndarray], expected: list[Tensor]) -> float:
    return max(float(np.abs(out - ref.numpy()).max()) for out, ref in zip(outputs, expected, strict=True))


def _save_checked(proto: onnx.ModelProto, path: Path, data_name: str, coo: int) -> bool:
    """Save ``proto`` (tensors in a ``data_name`` file past the protobuf limit) and run the ONNX
    checker on it; returns whether external data was used."""
    external = raw_bytes(proto) >= SINGLE_FILE_LIMIT
    try:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        onnx.checker.check_model(str(path), full_check=coo == 0)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise ExportError(f"the exported ONNX model is invalid: {exc}") from exc
    return external


def raw_bytes(model: onnx.ModelProto) -> int:
    graph = model.graph
    dense = sum(len(t.raw_data) for t in graph.initializer)
    return dense + sum(len(s.values.raw_data) + len(s.indices.raw_data) for s in graph.sparse_initializer)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    example_tokens: Tensor | None = None,
    sparse_initializers: bool | str = False,
    check: bool = True,
    atol: float = 1e-4,
    optimize: bool = True,
    quantize: str | None = None,
) -> ExportReport:
    """Export ``model`` to ``path`` as ONNX ``input_ids [batch, seq] -> logits [batch, seq, vocab]``.

    Args:
        model: an HF causal LM (or a module mapping token ids to logits); may contain
            graphprune kernels, which are lowered to dense Linears in the file.
        path: the ``.onnx`` file to write (replaced atomically if it exists).
        example_tokens: ``[batch, seq]`` ids to trace with (batch, seq >= 2); default a
            seeded ``[2, 16]`` batch.
        sparse_initializers: store mostly-zero weights compactly: ``True``/``"auto"``
            (smallest encoding per tensor), ``"coo"`` (ONNX SparseTensorProto only) or
            ``"bitmask"`` (see :mod:`graphprune.exporters.onnx_sparse`).
        check: compare onnxruntime with PyTorch on two probe batches.
        atol: largest accepted absolute logits difference.
        optimize: run the onnxscript graph optimizer of ``torch.onnx.export`` (constant
            folding, fusions: ~3x fewer nodes; costs a few seconds) and pack MatMuls that
            share an input.
        quantize: ``"int8"``: int8 weights with onnxruntime's dynamic quantization
            (:mod:`graphprune.exporters.quantize`). The float32 file is checked against
            PyTorch first (``atol``), then the int8 file against the float32 file's logits
            (relative error <= :data:`~graphprune.exporters.quantize.INT8_RTOL`); sparse
            initializers are applied to the int8 weights.

    Returns:
        An :class:`ExportReport` (path, bytes, max_abs_diff, seconds, sparse counts, ...).

    Raises:
        ExportError: export, checker, onnxruntime or the numerical comparison failed.
    """
    check_quantize(quantize, "onnx")
    start = time.perf_counter()
    final = Path(path)
    require_cpu(model)
    mode = "auto" if sparse_initializers is True else (sparse_initializers or None)
    with eval_mode(model), torch.no_grad():
        example = example_inputs(model, example_tokens)
        probes = probe_inputs(example, model)
        expected = reference_logits(model, probes) if check else []
        with kernels_lowered(model) as lowered:
            proto = _torch_export(lowered, example, optimize)
    if optimize:
        pack_shared_input_matmuls(proto)

    data_name = final.name + ".data"
    shapes = [(int(p.shape[0]), int(p.shape[1])) for p in probes]
    quant: dict[str, Any] = {}
    with staging_dir(final) as stage:
        staged = stage / final.name
        if quantize:
            # the float file first: it must match PyTorch before its int8 copy is judged against it
            float_path = stage / ("float32." + final.name)
            _save_checked(proto, float_path, data_name, coo=0)
            del proto
            float_out = _run_onnxruntime(float_path, probes) if check else []
            if check:
                quant["float_max_abs_diff"] = _max_diff(float_out, expected)
                check_diff(quant["float_max_abs_diff"], atol, "onnxruntime (float32 file)", shapes)
            stats = quantize_int8(float_path, staged)
            quant["quantize"] = quantize
            quant["quantized_matmuls"] = stats.quantized_matmuls
            quant["float32_bytes"] = stats.bytes_before
            float_path.unlink()
            proto = onnx.load(str(staged))
        dense_bytes = None
        coo = packed = 0
        if mode:
            raw = raw_bytes(proto)
            dense_bytes = proto.ByteSize() if raw < SINGLE_FILE_LIMIT else raw  # ByteSize overflows past 2 GB
            sparse = sparsify_initializers(proto, mode)
            coo, packed = sparse.coo, sparse.bitmask
            log.info(
                "sparse initializers: %d COO, %d bitmask; tensor bytes %d -> %d",
                coo,
                packed,
                sparse.bytes_before,
                sparse.bytes_after,
            )
        external = _save_checked(proto, staged, data_name, coo)
        del proto

        diff = None
        if check:
            outputs = _run_onnxruntime(staged, probes)
            diff = _max_diff(outputs, expected)
            if quantize:
                err = max(relative_error(o, f) for o, f in zip(outputs, float_out, strict=True))
                check_relative(err, INT8_RTOL, "file's logits")
                quant["relative_error"] = err
                quant["top1_agreement"] = float(
                    np.mean(np.concatenate([(o.argmax(-1) == f.argmax(-1)).ravel() for o, f in zip(outputs, float_out, strict=True)]))
                )
            else:
                check_diff(diff, atol, "onnxruntime", shapes)

        files = [stage / data_name] if external else []
        placed = publish(files + [staged], final.parent)
    size = sum(p.stat().st_size for p in placed)
    return ExportReport(
        path=final,
        format="onnx",
        bytes=size,
        max_abs_diff=diff,
        seconds=time.perf_counter() - start,
        sparse_initializers=coo,
        packed_initializers=packed,
        dense_bytes=dense_bytes,
        external_data=final.parent / data_name if external else None,
        probe_shapes=shapes,
        **quant,
    )
