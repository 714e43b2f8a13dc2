"""A sliced model (PCA rotation + 25 % slicing, saved as a folder) exports to ONNX and
TorchScript with outputs equal to PyTorch's, like dense and pruned models."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphprune.exporters import LogitsOnly, export_onnx, export_torchscript
from graphprune.models import load_model
from graphprune.models.tiny import random_tokens
from graphprune.pipeline import PruneJob, run_prune


@pytest.fixture(scope="module")
def sliced(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    tmp = tmp_path_factory.mktemp("sliced_export")
    text = tmp / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 120)
    out = tmp / "sliced"
    run_prune(PruneJob(model="tiny-llama", slicing=0.25, calib_samples=6, calib_len=32, text=[str(text)], out=str(out)),
              progress=False)
    model = load_model(str(out)).model
    assert model.config.hidden_size == 48  # 64 -> 48: the Linears really are smaller
    return model


def test_sliced_model_exports_to_onnx_and_matches(sliced, tmp_path) -> None:
    report = export_onnx(sliced, tmp_path / "sliced.onnx")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    onnx.checker.check_model(onnx.load(str(report.path)), full_check=True)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    wrapper = LogitsOnly(sliced)
    for batch, seq in [(1, 5), (3, 17)]:
        ids = random_tokens(batch, seq, seed=batch * seq)
        (out,) = session.run(["logits"], {"input_ids": ids.numpy()})
        with torch.no_grad():
            ref = wrapper(ids).numpy()
        assert out.shape == ref.shape and float(np.abs(out - ref).max()) <= 1e-4


def test_sliced_model_exports_to_torchscript_and_matches(sliced, tmp_path) -> None:
    report = export_torchscript(sliced, tmp_path / "sliced.pt")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    loaded = torch.jit.load(str(report.path))
    ids = random_tokens(2, 11, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), LogitsOnly(sliced)(ids), atol=1e-4, rtol=0)
