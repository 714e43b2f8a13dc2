"""ONNX translations for operators ``torch.onnx`` has none for.

transformers 5 runs MoE experts held as batched 3-D weights through its own operator
``transformers::grouped_mm_fallback(x, w, offsets)``: the routed tokens ``x [S, in]``
sorted by expert, the weights ``w [experts, in, out]``, and the cumulative row count of
each expert ``offsets [experts]``; expert ``e`` multiplies its rows
``x[offsets[e-1]:offsets[e]]`` by ``w[e]``. The number of experts is fixed by the weight's
shape, so the translation writes one ``Slice`` → ``MatMul`` per expert on its own rows
(an expert with no row multiplies an empty slice) and concatenates the results in order:
each expert computes only its routed tokens, as in the model.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def _grouped_mm(x: Any, w: Any, offsets: Any) -> Any:
    from onnxscript import ir, opset18

    op: Any = opset18  # the opset's operator signatures are typed for onnxscript's own tensor types

    experts = w.shape[0]
    if not isinstance(experts, int):
        raise ValueError("the grouped product's weight needs a static number of experts to export to ONNX")
    ends = op.Cast(offsets, to=ir.DataType.INT64)
    start = op.Constant(value_ints=[0])
    rows = op.Constant(value_ints=[0])
    parts = []
    for e in range(experts):
        end = op.Slice(ends, op.Constant(value_ints=[e]), op.Constant(value_ints=[e + 1]))
        part = op.Slice(x, start, end, rows)
        parts.append(op.MatMul(part, op.Gather(w, op.Constant(value_int=e), axis=0)))
        start = end
    return op.Concat(*parts, axis=0)


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: the operators above that the
    running transformers registers (none when it registers none)."""
    table: dict[Any, Callable[..., Any]] = {}
    namespace = getattr(torch.ops, "transformers", None)
    try:
        table[namespace.grouped_mm_fallback.default] = _grouped_mm  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        pass  # this transformers has no such operator: nothing to translate
    return table
