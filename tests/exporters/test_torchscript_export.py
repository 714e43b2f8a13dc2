"""TorchScript export: traced logits wrapper, checked by torch.jit.load in a fresh process."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

import graphprune.exporters.torchscript as ts_exporter
from graphprune.errors import ExportError
from graphprune.exporters import LogitsOnly, export_torchscript
from graphprune.kernels import BSRLinear, CSRLinear, has_kernels
from graphprune.models.tiny import random_tokens, tiny_llama, tiny_opt


def _llama_with_kernels() -> nn.Module:
    """tiny_llama with one CSR and one BSR kernel: they must trace and save as they are."""
    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    mlp.down_proj = CSRLinear.from_module(mlp.down_proj)
    mlp.up_proj = BSRLinear.from_linear(mlp.up_proj.weight, blocksize=8, min_zero_blocks=0.0)
    return model


@pytest.fixture(scope="module", params=["tiny-llama+kernels", "tiny-opt"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model = _llama_with_kernels() if request.param == "tiny-llama+kernels" else tiny_opt()
    path = tmp_path_factory.mktemp("ts") / "model.pt"
    return model, export_torchscript(model, path)


def test_fresh_process_check_passed(exported) -> None:
    _, report = exported
    assert report.format == "torchscript" and report.path.is_file()
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert report.bytes == report.path.stat().st_size
    assert sorted(p.name for p in report.path.parent.iterdir()) == ["model.pt"]


def test_loaded_module_has_dynamic_shapes(exported) -> None:
    model, report = exported
    loaded = torch.jit.load(str(report.path))
    wrapper = LogitsOnly(model)
    for batch, seq in [(1, 1), (3, 9)]:
        ids = random_tokens(batch, seq, seed=5)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), wrapper(ids), atol=1e-4, rtol=0)


def test_kernels_stay_sparse_in_the_file(exported) -> None:
    model, report = exported
    if not has_kernels(model):
        pytest.skip("dense model")
    loaded = torch.jit.load(str(report.path))
    buffers = dict(loaded.named_buffers())
    assert any(name.endswith("down_proj.crow_indices") for name in buffers)
    assert any(name.endswith("up_proj.values") for name in buffers)


def test_mismatch_raises_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ts_exporter, "check_in_fresh_process", lambda path, inputs, expected: 0.5)
    target = tmp_path / "model.pt"
    with pytest.raises(ExportError, match="differ from PyTorch by 0.5"):
        export_torchscript(tiny_llama(layers=1), target)
    assert not list(tmp_path.iterdir())


def test_unloadable_file_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(ExportError, match="fresh Python process"):
        ts_exporter.check_in_fresh_process(bad, [random_tokens(1, 2)], [torch.zeros(1, 2, 256)])


class _ScaledTanh(torch.autograd.Function):  # the classic style: forward(ctx, ...)
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return torch.tanh(x) * 2

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return grad * 2 * (1 - torch.tanh(x) ** 2)


class _Shift(torch.autograd.Function):  # the newer style: forward without ctx, setup_context
    @staticmethod
    def forward(x, k):  # type: ignore[no-untyped-def]
        return x + k

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        pass

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad, None


class _UsesFunctions(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Shift.apply(_ScaledTanh.apply(x), 0.5)


def test_custom_autograd_functions_are_traced_inline() -> None:
    """A custom autograd Function (BLOOM's GeLU is one) traces to its forward's tensor
    operations, not to a Python call a TorchScript file cannot hold; outside the context,
    and with gradients on, apply is the usual one (the backward still runs)."""
    original = torch.autograd.Function.__dict__["apply"]
    x = torch.randn(3, 5)
    expected = torch.tanh(x) * 2 + 0.5
    with torch.no_grad():
        plain = torch.jit.trace(_UsesFunctions(), (x,), check_trace=False)
    kinds = {n.kind() for n in plain.graph.nodes()}
    assert "prim::PythonOp" in kinds  # what the tracer records without help: a file cannot hold it
    with pytest.raises(RuntimeError):
        torch.jit.save(plain, io.BytesIO())
    with torch.no_grad(), ts_exporter.autograd_functions_inlined():
        traced = torch.jit.trace(_UsesFunctions(), (x,), check_trace=False)
    assert "prim::PythonOp" not in {n.kind() for n in traced.graph.nodes()}
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    traced = torch.jit.load(io.BytesIO(buffer.getvalue()))
    y = torch.randn(4, 2)
    assert torch.allclose(traced(y), torch.tanh(y) * 2 + 0.5) and torch.allclose(traced(x), expected)
    leaf = x.clone().requires_grad_(True)
    with ts_exporter.autograd_functions_inlined():
        _UsesFunctions()(leaf).sum().backward()  # gradients on: the Function's own backward
    assert torch.allclose(leaf.grad, 2 * (1 - torch.tanh(x) ** 2))
    assert torch.autograd.Function.__dict__["apply"] is original  # restored on leaving
