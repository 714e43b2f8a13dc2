"""RewriteKernelsPass with an injected fake timer: graph rewrite, logits, model/graph sharing, exports."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from graphprune.errors import ConfigError, PassOrderError
from graphprune.exporters import export_onnx
from graphprune.exporters.hf import save_hf_folder
from graphprune.graph.model import GraphModel
from graphprune.kernels import CSRLinear, DenseLinear, KernelLinear, kernels_lowered
from graphprune.passes.infra import PassContext, PassManager, Prop
from graphprune.passes.rewrite_kernels import RewriteKernelsPass, kernel_summary

aten = torch.ops.aten


def fake_timer(seconds: dict[str, float]):
    """Median seconds per kernel kind, no clock involved."""

    def timer(module: KernelLinear, x: torch.Tensor, *, repeats: int, warmup: int) -> float:
        return seconds.get(module.kind, 10.0)

    return timer


CSR_WINS = fake_timer({"dense": 2.0, "csr": 1.0})
DENSE_WINS = fake_timer({"dense": 1.0, "csr": 2.0})


def magnitude_prune(gm: GraphModel, sparsity: float = 0.5) -> GraphModel:
    """What SequentialPrunePass leaves behind, without calibration: zeroed weights, masks, Prop.PRUNED."""
    masks = gm.state.masks
    for li in gm.block_linears():
        w = gm.get_attr(li.weight).detach().clone()
        k = int(w.shape[1] * sparsity)
        drop = w.abs().argsort(dim=1)[:, :k]
        keep = torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)
        gm.set_weight(li.weight, w * keep)
        masks[li.name] = keep
    gm.props.add(Prop.PRUNED)
    return gm


def linear_nodes(gm: GraphModel) -> list[torch.fx.Node]:
    return [n for n in gm.gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]


def kernel_nodes(gm: GraphModel) -> list[torch.fx.Node]:
    return [n for n in gm.gm.graph.nodes if n.op == "call_module" and isinstance(gm.gm.get_submodule(n.target), KernelLinear)]


def test_forced_csr_rewrites_every_pruned_linear(tiny_gm, tokens) -> None:
    gm = magnitude_prune(tiny_gm)
    pruned = set(gm.state.masks)
    before = gm(tokens)
    dense_linears = len(linear_nodes(gm))
    manager = PassManager([RewriteKernelsPass(tokens=16, timer=CSR_WINS)], PassContext(progress=False))
    gm = manager.run(gm)  # verify=True: lint + the manager's own logits check
    gm.lint()

    calls = kernel_nodes(gm)
    assert len(calls) == len(pruned)
    assert len(linear_nodes(gm)) == dense_linears - len(pruned)  # the LM head (not pruned) stays aten.linear
    assert {li.name for li in gm.linears} & pruned == set()
    holders = {f"lm.{name}" for name in pruned}  # the dense weights are no longer read (nor held)
    assert not [n for n in gm.gm.graph.nodes if n.op == "get_attr" and str(n.target).rsplit(".", 1)[0] in holders]
    for node in calls:
        kernel = gm.gm.get_submodule(node.target)
        assert isinstance(kernel, CSRLinear)
        name = node.target.split(".", 1)[1]  # graph path without the capture root
        assert gm.model.get_submodule(name) is kernel  # one object in graph and model
        assert node.meta.get("nn_module_stack")  # keeps the Linear's provenance
    torch.testing.assert_close(gm(tokens), before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        eager = gm.model(input_ids=tokens, use_cache=False).logits
    torch.testing.assert_close(eager, before, atol=1e-5, rtol=1e-5)

    meta = gm.state.kernels
    assert set(meta) == pruned
    entry = next(iter(meta.values()))
    assert entry["choice"] == "csr" and entry["rewritten"]
    assert entry["times"]["16"]["dense"] == 2.0 and entry["times"]["16"]["csr"] == 1.0 and set(entry["times"]) == {"16"}
    assert entry["decode"] == entry["prefill"] == "csr" and entry["sparsity"] == pytest.approx(0.5, abs=0.02)
    stats = manager.report()[0]
    assert stats["rewritten"] == len(pruned) and stats["choices"] == {"csr": len(pruned)}
    assert stats["prefill_tokens"] == [16] and stats["decode_tokens"] == []
    assert Prop.KERNELS in gm.props
    assert kernel_summary(gm)["choices"] == {"csr": len(pruned)}

    # idempotent: the rewritten Linears are no longer candidates
    again = RewriteKernelsPass(tokens=16, timer=CSR_WINS).run(gm, PassContext(progress=False))
    assert not again.modified and again.stats["linears"] == 0


def test_dense_stays_dense_when_sparse_is_slower(tiny_gm, tokens) -> None:
    gm = magnitude_prune(tiny_gm)
    code = gm.gm.code
    result = RewriteKernelsPass(tokens=16, timer=DENSE_WINS).run(gm, PassContext(progress=False))
    assert not result.modified and result.stats["rewritten"] == 0
    assert result.stats["choices"] == {"dense": len(gm.state.masks)}
    assert gm.gm.code == code and not kernel_nodes(gm)
    assert not any(isinstance(m, KernelLinear) for m in gm.model.modules())


def test_a_sparse_win_that_does_not_repeat_keeps_dense(tiny_gm) -> None:
    gm = magnitude_prune(tiny_gm)
    calls: list[str] = []

    def flaky(module: KernelLinear, x: torch.Tensor, *, repeats: int, warmup: int) -> float:
        calls.append(module.kind)
        dense_runs = calls.count("dense")
        if module.kind == "dense":
            return 5.0 if dense_runs % 2 else 1.0  # the first dense measurement of each Linear stalls
        return 2.0

    result = RewriteKernelsPass(tokens=8, timer=flaky).run(gm, PassContext(progress=False))
    assert not result.modified and result.stats["choices"] == {"dense": len(gm.state.masks)}
    entry = next(iter(gm.state.kernels.values()))
    assert entry["times"]["8"]["csr"] < entry["times"]["8"]["dense"] and "did not win again" in entry["kept_dense_because"]


@pytest.mark.parametrize("tiny_name", ["tiny-llama"])
def test_rewritten_model_exports_and_saves(tiny_gm, tmp_path, tokens) -> None:
    gm = magnitude_prune(tiny_gm)
    before = gm(tokens)
    gm = PassManager([RewriteKernelsPass(tokens=16, timer=CSR_WINS, include=["*.mlp.*"])], PassContext(progress=False)).run(gm)
    assert {type(gm.gm.get_submodule(n.target)) for n in kernel_nodes(gm)} == {CSRLinear}
    assert len(kernel_nodes(gm)) == 2 * 3  # two blocks x gate/up/down

    report = export_onnx(gm.model, tmp_path / "model.onnx", sparse_initializers=True, optimize=False)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4  # onnxruntime vs the CSR model
    assert report.dense_bytes is not None and report.bytes < report.dense_bytes
    assert isinstance(gm.model.model.layers[0].mlp.down_proj, CSRLinear)  # kernels restored after export

    save_hf_folder(gm.model, None, tmp_path / "folder")
    assert isinstance(gm.model.model.layers[0].mlp.down_proj, CSRLinear)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folder").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, before, atol=1e-5, rtol=1e-5)


def test_requires_pruned_weights(tiny_gm) -> None:
    with pytest.raises(PassOrderError, match="rewrite_kernels requires"):
        PassManager([RewriteKernelsPass(timer=CSR_WINS)]).run(tiny_gm)


def test_dtype_mismatch_is_a_clear_error(tiny_gm) -> None:
    gm = magnitude_prune(tiny_gm)
    with pytest.raises(ConfigError, match="cast the model"):
        RewriteKernelsPass(dtype=torch.float64, timer=CSR_WINS).run(gm, PassContext(progress=False))


def test_lowering_gives_back_plain_linears(tiny_gm, tokens) -> None:
    gm = magnitude_prune(tiny_gm)
    RewriteKernelsPass(tokens=8, timer=CSR_WINS).run(gm, PassContext(progress=False))
    with kernels_lowered(gm.model) as lowered:
        assert not any(isinstance(m, KernelLinear) for m in lowered.modules())
    assert not any(isinstance(m, DenseLinear) for m in gm.model.modules())


def by_rows(decode_winner: str, max_rows: int = 8):
    """Fake timer: ``decode_winner`` is fastest on up to ``max_rows`` input rows, dense above."""

    def timer(module: KernelLinear, x: torch.Tensor, *, repeats: int, warmup: int) -> float:
        winner = decode_winner if x.shape[0] <= max_rows else "dense"
        return 1.0 if module.kind == winner else 3.0

    return timer


@pytest.mark.parametrize("tiny_name", ["tiny-llama"])
def test_decode_and_prefill_kernels_for_one_weight(tiny_gm, tokens, tmp_path) -> None:
    from graphprune.kernels.regime import RegimeLinear, plan_of, read_plan

    gm = magnitude_prune(tiny_gm)
    before = gm(tokens)
    result = RewriteKernelsPass(tokens=(1, 8, 128), candidates=["csr"], timer=by_rows("csr")).run(gm, PassContext(progress=False))
    pruned = len(gm.state.masks)
    assert result.stats["choices"] == {"csr+dense": pruned} and result.stats["rewritten"] == pruned
    assert result.stats["decode_tokens"] == [1, 8] and result.stats["prefill_tokens"] == [128]
    assert result.stats["linear_seconds_chosen"]["1"] * 3 == result.stats["linear_seconds_dense"]["1"]
    assert result.stats["linear_seconds_chosen"]["128"] == result.stats["linear_seconds_dense"]["128"]
    kernels = [gm.gm.get_submodule(n.target) for n in kernel_nodes(gm)]
    assert len(kernels) == pruned and all(isinstance(k, RegimeLinear) for k in kernels)
    assert isinstance(gm.model.model.layers[0].mlp.down_proj, RegimeLinear)
    torch.testing.assert_close(gm(tokens), before, atol=1e-5, rtol=1e-5)  # 32 rows: the dense prefill kernel
    torch.testing.assert_close(gm(tokens[:1, :4]), before[:1, :4], atol=1e-5, rtol=1e-5)  # 4 rows: CSR
    assert set(plan_of(gm.model)["linears"]) == set(gm.state.masks)
    save_hf_folder(gm.model, None, tmp_path / "folder")
    assert read_plan(tmp_path / "folder")["linears"] == plan_of(gm.model)["linears"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folder").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, before, atol=1e-5, rtol=1e-5)
