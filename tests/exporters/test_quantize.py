"""int8 on top of pruning: onnxruntime's dynamic per-channel quantization of exported files.

The quantized weights are checked against the closed form of symmetric per-channel int8
(scale = max |w| / 127 per output channel, |q * scale - w| <= scale / 2), pruned zeros must
stay exact zeros, and sparse initializers on int8 weights must not change a single logit.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from graphprune.cli import main
from graphprune.errors import ConfigError, ExportError
from graphprune.exporters import export_onnx
from graphprune.exporters import quantize as quantize_module
from graphprune.exporters.common import ort_session
from graphprune.exporters.generation import export_generation
from graphprune.exporters.quantize import INT8_RTOL, check_quantize, quantize_int8
from graphprune.exporters.runners import check_prompts, generate, load_runner
from graphprune.models.loader import ByteTokenizer
from graphprune.models.tiny import random_tokens, tiny_llama


def _prune_half(model: nn.Module) -> nn.Module:
    """Zero the smaller half of every block Linear's weights."""
    with torch.no_grad():
        for layer in model.model.layers:  # type: ignore[union-attr]
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    w = module.weight
                    w[w.abs() <= w.abs().median()] = 0
    return model


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _logits(path: Path, ids: torch.Tensor) -> np.ndarray:
    return ort_session(path).run(["logits"], {"input_ids": ids.numpy()})[0]


def test_int8_weights_are_symmetric_per_channel_and_keep_pruned_zeros(tmp_path: Path) -> None:
    model = _prune_half(tiny_llama().eval())
    export_onnx(model, tmp_path / "f.onnx")
    stats = quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx")
    # attention's QK^T and PV (2 layers) and the kept down projections stay float
    assert stats.quantized_matmuls > 0 and stats.float_matmuls <= 4 + stats.kept_float
    assert stats.materialised_transposes >= 0
    floats = _initializers(tmp_path / "f.onnx")
    quant = _initializers(tmp_path / "q.onnx")
    checked = 0
    for name, q in quant.items():
        if not name.endswith("_quantized"):
            continue
        base = name[: -len("_quantized")]
        w = floats[base] if base in floats else floats[base.removesuffix("__transposed")].T
        scale = quant[base + "_scale"]
        assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (w.shape[1],)
        assert not quant[base + "_zero_point"].any()  # symmetric
        np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
        assert np.all(np.abs(q.astype(np.float32) * scale - w) <= scale / 2 + 1e-7)
        if "layers" in base:
            assert np.array_equal(q == 0, w == 0) or np.all(q[w == 0] == 0)
        checked += 1
    assert checked == stats.quantized_matmuls


def test_tied_lm_head_is_quantized_too(tmp_path: Path) -> None:
    """The largest matrix of a small model: the head that shares the embedding table."""
    model = tiny_llama(tie=True).eval()
    export_onnx(model, tmp_path / "f.onnx")
    stats = quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx")
    quant = onnx.load(str(tmp_path / "q.onnx"))
    vocab = model.config.vocab_size
    int8 = [numpy_helper.to_array(i) for i in quant.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert any(vocab in a.shape for a in int8), "no int8 weight with the vocabulary dimension: the head stayed float"
    matmuls = sum(n.op_type == "MatMul" for n in onnx.load(str(tmp_path / "f.onnx")).graph.node)
    assert stats.quantized_matmuls + stats.float_matmuls == matmuls and stats.materialised_transposes == 1
    # packed q/k/v, o, packed gate/up per layer, and the head; the down projections stay float32
    layers = model.config.num_hidden_layers
    assert stats.kept_float == layers and stats.quantized_matmuls == 3 * layers + 1
    everything = quantize_int8(tmp_path / "f.onnx", tmp_path / "all.onnx", keep_float=())
    assert everything.kept_float == 0 and everything.quantized_matmuls == 4 * layers + 1


def test_kept_float_matmuls_are_the_mlp_output_projections(tmp_path: Path) -> None:
    """The exporter's module paths survive packing; the kept MatMuls are exactly the down
    projections, whose weights stay the float32 weights."""
    from graphprune.exporters.onnx_rewrite import module_paths

    model = tiny_llama().eval()
    export_onnx(model, tmp_path / "f.onnx")
    quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx")
    proto = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    floats = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    paths = sorted(p for n in floats for p in module_paths(n))
    assert paths == [f"lm.model.layers.{i}.mlp.down_proj" for i in range(model.config.num_hidden_layers)]
    for node, layer in zip(floats, model.model.layers, strict=True):
        np.testing.assert_array_equal(inits[node.input[1]], layer.mlp.down_proj.weight.detach().numpy().T)
    packed = [n for n in proto.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert packed, "nothing was quantized"


def test_export_int8_with_sparse_initializers(tmp_path: Path) -> None:
    model = _prune_half(tiny_llama().eval())
    plain = export_onnx(model, tmp_path / "q.onnx", quantize="int8")
    packed = export_onnx(model, tmp_path / "qs.onnx", quantize="int8", sparse_initializers=True)
    assert plain.quantize == "int8" and plain.float32_bytes and plain.bytes < plain.float32_bytes
    assert plain.relative_error is not None and 0 < plain.relative_error <= INT8_RTOL
    assert plain.float_max_abs_diff is not None and plain.float_max_abs_diff < 1e-4
    assert packed.packed_initializers > 0 and packed.bytes < plain.bytes
    ids = random_tokens(3, 11, seed=3)
    assert np.array_equal(_logits(tmp_path / "q.onnx", ids), _logits(tmp_path / "qs.onnx", ids))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    got = _logits(tmp_path / "q.onnx", ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= INT8_RTOL


def test_broken_quantization_is_refused_and_nothing_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantizer that scales wrongly must not pass the check against the float file."""
    real = quantize_module.quantize_int8

    def broken(src: Path, dst: Path):  # type: ignore[no-untyped-def]
        stats = real(src, dst)
        proto = onnx.load(str(dst))
        for init in proto.graph.initializer:
            if init.name.endswith("_scale"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3, init.name))
        onnx.save(proto, str(dst))
        return stats

    import graphprune.exporters.onnx as onnx_module

    monkeypatch.setattr(onnx_module, "quantize_int8", broken)
    with pytest.raises(ExportError, match="relative"):
        export_onnx(tiny_llama().eval(), tmp_path / "q.onnx", quantize="int8")
    assert list(tmp_path.iterdir()) == []


def test_generation_export_int8_and_sparse(tmp_path: Path) -> None:
    model = _prune_half(tiny_llama().eval())
    tok = ByteTokenizer()
    rep = export_generation(model, tmp_path / "q", tokenizer=tok, quantize="int8", sparse_initializers=True, check_tokens=8)
    desc = json.loads((tmp_path / "q" / "generation.json").read_text())
    assert desc["quantize"] == "int8" and rep.quantize == "int8"
    assert rep.tokens_equal is True  # the float32 file matched eager before it was quantized
    assert rep.relative_error is not None and 0 < rep.relative_error <= INT8_RTOL
    assert rep.int8_equal_tokens is not None and 0 <= rep.int8_equal_tokens <= 8
    assert rep.sparse_initializers > 0 and rep.float32_bytes and rep.bytes < rep.float32_bytes
    kinds = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node}
    assert "MatMulInteger" in kinds
    ids, mask = check_prompts(model.config.vocab_size)
    out = generate(load_runner(tmp_path / "q"), ids, mask, max_new_tokens=4, stop_at_eos=False)
    assert out.tokens.shape == (2, 4)


def test_generation_sparse_initializers_keep_logits(tmp_path: Path) -> None:
    model = _prune_half(tiny_llama().eval())
    export_generation(model, tmp_path / "f", check_tokens=0)
    rep = export_generation(model, tmp_path / "s", sparse_initializers=True, check_tokens=4)
    assert rep.sparse_initializers > 0 and rep.relative_error == 0.0
    ids, mask = check_prompts(model.config.vocab_size)
    a = generate(load_runner(tmp_path / "f"), ids, mask, max_new_tokens=3, stop_at_eos=False, keep_logits=True)
    b = generate(load_runner(tmp_path / "s"), ids, mask, max_new_tokens=3, stop_at_eos=False, keep_logits=True)
    assert a.logits is not None and b.logits is not None and torch.equal(a.logits, b.logits)


def test_quantize_needs_onnx() -> None:
    with pytest.raises(ConfigError, match="--format onnx"):
        check_quantize("int8", "torchscript")
    with pytest.raises(ConfigError, match="unknown quantization"):
        check_quantize("int4", "onnx")


def test_cli_int8_torchscript_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", "tiny-llama", "--format", "torchscript", "--quantize", "int8", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "--format onnx" in err and not (tmp_path / "m.pt").exists()


def test_cli_int8_export_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", "tiny-llama", "--format", "onnx", "--quantize", "int8", "--out", str(tmp_path / "m.onnx"), "-q"])
    out = capsys.readouterr().out
    assert code == 0 and "onnx int8" in out and "top-1" in out and (tmp_path / "m.onnx").is_file()
