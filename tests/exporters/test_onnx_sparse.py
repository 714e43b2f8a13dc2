"""Sparse initializer encodings on a small hand-built ONNX graph (no torch export: fast)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from graphprune.errors import ExportError
from graphprune.exporters import sparsify_initializers


def _weight(shape: tuple[int, int], sparsity: float, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(dtype)
    w[rng.random(shape) < sparsity] = 0
    return w


def _model(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x [n, 64] -> MatMul w1 [64, 128] -> Relu -> MatMul w2 [128, 32] -> y."""
    elem = helper.np_dtype_to_tensor_dtype(w1.dtype)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", elem, ["n", 64])],
        [helper.make_tensor_value_info("y", elem, ["n", 32])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(9).standard_normal((5, 64)).astype(np.float32)


def test_auto_picks_bitmask_at_half_and_coo_when_nearly_empty(x: np.ndarray) -> None:
    model = _model(_weight((64, 128), 0.5, 0), _weight((128, 32), 0.995, 1))
    expected = _run(model, x)
    before = model.ByteSize()
    stats = sparsify_initializers(model, "auto")
    assert (stats.bitmask, stats.coo) == (1, 1)
    assert [s.values.name for s in model.graph.sparse_initializer] == ["w2"]
    assert model.ByteSize() < 0.6 * before
    onnx.checker.check_model(model)  # full_check rejects COO inputs to ops (onnx limitation)
    np.testing.assert_array_equal(_run(model, x), expected)


def test_bitmask_only_is_full_check_clean(x: np.ndarray) -> None:
    model = _model(_weight((64, 128), 0.5, 0), _weight((128, 32), 0.5, 1))
    expected = _run(model, x)
    stats = sparsify_initializers(model, "bitmask")
    assert stats.bitmask == 2 and stats.coo == 0 and stats.bytes_after < 0.6 * stats.bytes_before
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(_run(model, x), expected)


def test_coo_does_not_pay_at_half_sparsity() -> None:
    # int64 indices (required by the ONNX checker) cost 8 bytes per nonzero: COO grows a 50 % tensor
    model = _model(_weight((64, 128), 0.5, 0), _weight((128, 32), 0.5, 1))
    stats = sparsify_initializers(model, "coo")
    assert stats.coo == 0 and not model.graph.sparse_initializer


def test_float16_weights(x: np.ndarray) -> None:
    model = _model(_weight((64, 128), 0.6, 0, np.float16), _weight((128, 32), 0.6, 1, np.float16))
    x16 = x.astype(np.float16)
    expected = _run(model, x16)
    assert sparsify_initializers(model, "bitmask").bitmask == 2
    np.testing.assert_array_equal(_run(model, x16), expected)


def test_small_dense_and_all_zero_tensors(x: np.ndarray) -> None:
    model = _model(_weight((64, 128), 0.0, 0), np.zeros((128, 32), np.float32))
    stats = sparsify_initializers(model, "auto")
    assert stats.bitmask == 0 and stats.coo == 1  # the dense one stays, the empty one is COO with nnz 0
    np.testing.assert_array_equal(_run(model, x), np.zeros((5, 32), np.float32))


def test_unknown_mode() -> None:
    with pytest.raises(ExportError, match="unknown sparse initializer mode"):
        sparsify_initializers(_model(_weight((64, 128), 0.5, 0), _weight((128, 32), 0.5, 1)), "csr")
