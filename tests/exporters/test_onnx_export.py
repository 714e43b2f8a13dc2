"""ONNX export of the tiny models, dense and 2:4-pruned: checker, dynamic axes, onnxruntime parity.

Each (model, weights) pair is exported once per module (an export takes seconds).
The pruned exports use sparse initializers, so the same files prove that sparse
storage shrinks a 50 %-sparse model and still matches PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import graphprune.exporters.onnx as onnx_exporter
from graphprune.errors import ExportError
from graphprune.exporters import ExportReport, LogitsOnly, export_onnx
from graphprune.kernels import CSRLinear
from graphprune.models.tiny import random_tokens, tiny_llama, tiny_opt

MODELS = {"tiny-llama": tiny_llama, "tiny-opt": tiny_opt}


def prune_2_4(model: nn.Module) -> nn.Module:
    """Zero the 2 smallest-magnitude weights of every 4 consecutive inputs in each decoder Linear."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name and p.shape[1] % 4 == 0:
                groups = p.view(p.shape[0], -1, 4)
                groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
    return model


CASES = [("tiny-llama", "dense"), ("tiny-llama", "2:4"), ("tiny-opt", "dense"), ("tiny-opt", "2:4")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{w}" for m, w in CASES])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name, weights = request.param
    model = MODELS[name]()
    sparse = weights == "2:4"
    if sparse:
        prune_2_4(model)
    folder = tmp_path_factory.mktemp(f"{name}-{weights.replace(':', '_')}")
    # the pruned exports skip the onnxscript optimizer: both graph forms get covered, and faster
    report = export_onnx(model, folder / "model.onnx", sparse_initializers=sparse, optimize=not sparse)
    return model, report, sparse


def test_report_describes_the_file(exported) -> None:
    _, report, sparse = exported
    assert isinstance(report, ExportReport) and report.format == "onnx"
    assert report.path.is_file() and report.bytes == report.path.stat().st_size
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert report.seconds > 0 and report.external_data is None
    assert len({tuple(s) for s in report.probe_shapes}) == 2  # two shapes: dynamic axes checked
    assert sorted(p.name for p in report.path.parent.iterdir()) == ["model.onnx"]  # nothing staged left
    assert set(report.to_dict()) >= {"path", "bytes", "max_abs_diff", "seconds", "sparse_initializers"}


def test_checker_clean_with_dynamic_axes(exported) -> None:
    _, report, _ = exported
    model = onnx.load(str(report.path))
    onnx.checker.check_model(model, full_check=not model.graph.sparse_initializer)
    (inp,) = model.graph.input
    assert inp.name == "input_ids"
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_onnxruntime_matches_pytorch_on_new_shapes(exported) -> None:
    model, report, _ = exported
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    wrapper = LogitsOnly(model)
    for batch, seq in [(1, 7), (4, 19)]:
        ids = random_tokens(batch, seq, seed=batch + seq)
        (out,) = session.run(["logits"], {"input_ids": ids.numpy()})
        with torch.no_grad():
            ref = wrapper(ids).numpy()
        assert out.shape == ref.shape == (batch, seq, 256)
        assert float(np.abs(out - ref).max()) <= 1e-4


def test_pruned_weights_survive_and_sparse_storage_shrinks(exported) -> None:
    model, report, sparse = exported
    if not sparse:
        assert report.dense_bytes is None and report.packed_initializers == report.sparse_initializers == 0
        return
    assert report.packed_initializers + report.sparse_initializers > 0
    assert report.dense_bytes is not None and report.bytes < 0.95 * report.dense_bytes
    # The decode subgraph rebuilds exactly the pruned weights: onnxruntime already matched, and
    # the stored nonzero count equals the model's.
    proto = onnx.load(str(report.path))
    stored = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    packed_values = sum(v.size - 1 for k, v in stored.items() if k.endswith("/values"))
    assert packed_values > 0
    assert packed_values <= sum(int((p != 0).sum()) for n, p in model.named_parameters() if ".layers." in n)


def test_mismatch_raises_and_leaves_nothing(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, report, sparse = exported
    if sparse:
        pytest.skip("one failure-path check per model is enough")
    broken = onnx.load(str(report.path))
    largest = max(broken.graph.initializer, key=lambda t: len(t.raw_data))
    # noise, not a constant shift: LayerNorm models would cancel a shift of the embeddings
    noise = np.random.default_rng(0).standard_normal(tuple(largest.dims)).astype(np.float32)
    largest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(largest) + noise, largest.name))
    monkeypatch.setattr(onnx_exporter, "_torch_export", lambda m, ex, opt: broken)
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(model, target)
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_kernels_are_lowered_for_export_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    kernel = CSRLinear.from_module(model.model.layers[0].mlp.down_proj)
    model.model.layers[0].mlp.down_proj = kernel
    seen = {}

    def fake_export(m: nn.Module, example: torch.Tensor, optimize: bool) -> onnx.ModelProto:
        seen["layer"] = type(m.model.layers[0].mlp.down_proj)
        raise ExportError("stop here")

    monkeypatch.setattr(onnx_exporter, "_torch_export", fake_export)
    with pytest.raises(ExportError, match="stop here"):
        export_onnx(model, tmp_path / "m.onnx")
    assert seen["layer"] is nn.Linear
    assert model.model.layers[0].mlp.down_proj is kernel


def test_example_tokens_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="batch >= 2"):
        export_onnx(tiny_llama(), tmp_path / "m.onnx", example_tokens=random_tokens(1, 8))
    with pytest.raises(ExportError, match="integer token ids"):
        export_onnx(tiny_llama(), tmp_path / "m.onnx", example_tokens=torch.zeros(2, 8))
    assert not list(tmp_path.iterdir())


def test_packing_shared_input_matmuls_keeps_logits(tmp_path) -> None:
    """q/k/v and gate/up read one activation each: packed into one MatMul + Split per group
    (two groups per layer, also when one layer is narrower), logits unchanged."""
    import copy

    from graphprune.exporters.common import ort_session
    from graphprune.exporters.onnx import _torch_export
    from graphprune.exporters.onnx_rewrite import pack_shared_input_matmuls
    from graphprune.models.tiny import random_tokens, tiny_llama

    model = tiny_llama().eval()
    mlp = model.model.layers[1].mlp
    with torch.no_grad():  # layer 1 keeps 96 of 128 MLP channels: groups of other widths
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = nn.Linear(64, 96, bias=False)
            new.weight.copy_(old.weight[:96])
            setattr(mlp, name, new)
        down = nn.Linear(96, 64, bias=False)
        down.weight.copy_(mlp.down_proj.weight[:, :96])
        mlp.down_proj = down
        proto = _torch_export(model, torch.randint(0, 256, (2, 16)), optimize=True)
    plain = copy.deepcopy(proto)
    stats = pack_shared_input_matmuls(proto)
    layers = model.config.num_hidden_layers
    assert stats.groups == 2 * layers
    assert stats.matmuls_before - stats.matmuls_after == layers * (2 + 1)  # q,k,v -> 1 and gate,up -> 1
    splits = [n for n in proto.graph.node if n.op_type == "Split"]
    sizes = sorted(tuple(numpy_helper.to_array(i).tolist()) for i in proto.graph.initializer if i.name.endswith("/split"))
    assert len(splits) >= 2 * layers and (96, 96) in sizes and (128, 128) in sizes
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    onnx.save(proto, str(tmp_path / "packed.onnx"))
    onnx.checker.check_model(str(tmp_path / "packed.onnx"), full_check=True)
    ids = random_tokens(3, 9, seed=4)
    a = ort_session(tmp_path / "plain.onnx").run(["logits"], {"input_ids": ids.numpy()})[0]
    b = ort_session(tmp_path / "packed.onnx").run(["logits"], {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_moe_experts_export_one_matmul_per_expert_on_its_rows(tmp_path: Path) -> None:
    """transformers' grouped expert product becomes a Slice + MatMul per expert; onnxruntime
    agrees with PyTorch, also on one token (two of the four experts get no row at all)."""
    from graphprune.graph.linears import standard_linears
    from graphprune.models.zoo import zoo_model

    model = zoo_model("mixtral").eval()
    standard_linears(model)
    report = export_onnx(model, tmp_path / "moe.onnx", optimize=False)
    proto = onnx.load(str(report.path))
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("MatMul") >= 2 * 2 * 4  # two grouped products per block, four experts each
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    for ids in (random_tokens(1, 1, seed=2), random_tokens(3, 9, seed=4)):
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.numpy()
        out = session.run(["logits"], {"input_ids": ids.numpy()})[0]
        assert np.abs(out - ref).max() <= 1e-4
