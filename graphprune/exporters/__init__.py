"""Exporters: ONNX (checked in onnxruntime), TorchScript (checked in a fresh process).

Every exporter writes to a staging path next to the target and renames into place
only after its checks pass, and returns an :class:`ExportReport`.
"""

from graphprune.exporters.common import ExportReport, LogitsOnly
from graphprune.exporters.onnx import export_onnx
from graphprune.exporters.onnx_sparse import SparseEncodingStats, sparsify_initializers
from graphprune.exporters.torchscript import export_torchscript, trace_logits

__all__ = [
    "ExportReport",
    "LogitsOnly",
    "SparseEncodingStats",
    "export_onnx",
    "export_torchscript",
    "sparsify_initializers",
    "trace_logits",
]
