"""SlicePass: 0 % is the identity, slicing equals zeroing the dropped subspace, sliced models save and load."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from graphprune.errors import ConfigError, ExportError
from graphprune.graph.edit import parameter_count
from graphprune.graph.model import GraphModel
from graphprune.graph.stream import find_stream
from graphprune.models import load_model
from graphprune.models.tiny import random_tokens
from graphprune.passes.fold_norms import FoldNormsPass
from graphprune.passes.infra import PassContext, PassManager, Prop, relative_diff
from graphprune.passes.rotate import RotatePass
from graphprune.passes.slice import SlicePass, slice_multiple, sliced_width
from graphprune.pipeline import PruneJob, run_prune


def _ctx() -> PassContext:
    return PassContext(progress=False, calibration=random_tokens(6, 32, seed=3))


def _rotated(gm: GraphModel, source: str = "pca") -> GraphModel:
    return PassManager([FoldNormsPass(), RotatePass(source)], _ctx()).run(gm)


def test_sliced_width() -> None:
    assert sliced_width(576, 0.0) == 576
    assert sliced_width(576, 0.3) == 400 and sliced_width(576, 0.25) == 432 and sliced_width(576, 0.2) == 464
    assert sliced_width(64, 0.25) == 48 and sliced_width(64, 0.99) == 8
    # SmolLM2 has 9 heads: transformers needs hidden_size % heads == 0, lcm(8, 9) = 72 is too coarse
    smol = SimpleNamespace(config=SimpleNamespace(num_attention_heads=9))
    m = slice_multiple(smol, 576)
    assert m == 9 and [sliced_width(576, f, m) for f in (0.2, 0.25, 0.3)] == [459, 432, 405]
    assert slice_multiple(SimpleNamespace(config=SimpleNamespace(num_attention_heads=32)), 4096) == 32
    with pytest.raises(ConfigError, match="slicing fraction"):
        sliced_width(64, 1.0)


def test_slicing_by_zero_is_the_identity(tiny_gm: GraphModel, tokens: torch.Tensor) -> None:
    gm = _rotated(tiny_gm)
    before = gm(tokens)
    shapes = {n: tuple(p.shape) for n, p in gm.model.named_parameters()}
    res = SlicePass(0.0).run(gm, _ctx())
    assert not res.modified and res.stats["sliced_width"] == res.stats["width"]
    assert torch.equal(gm(tokens), before)
    assert shapes == {n: tuple(p.shape) for n, p in gm.model.named_parameters()}


def _check_slice_matches_zeroing(gm: GraphModel, tokens: torch.Tensor) -> GraphModel:
    """Sliced model == rotated model whose stream is projected on its first d' coordinates
    (writers' rows and embedding columns beyond d' set to zero; norms over the full width)."""
    keep = sliced_width(64, 0.25)
    reference = gm.clone()
    stream = find_stream(reference)
    with torch.no_grad():
        for _, target in stream.embeddings:
            reference.get_attr(target)[:, keep:] = 0
        for li in stream.writers:
            reference.get_attr(li.weight)[keep:, :] = 0
            if li.bias is not None:
                reference.get_attr(li.bias)[keep:] = 0
        for e in stream.expert_writers:  # an expert's [out, in] view of the batched weight
            reference.matrix(e)[keep:, :] = 0
    expected = reference(tokens)
    gm = PassManager([SlicePass(0.25)], _ctx()).run(gm)
    assert Prop.SLICED in gm.props
    assert relative_diff(gm(tokens), expected) <= 1e-4
    stream = find_stream(gm)
    assert stream.width == keep
    assert all(li.in_features == keep for li in stream.readers)
    assert all(li.out_features == keep for li in stream.writers)
    assert all(e.in_features == keep for e in stream.expert_readers) and all(e.out_features == keep for e in stream.expert_writers)
    info = gm.state.slicing
    assert info["parameters_after"] < info["parameters_before"] == parameter_count(reference.model)
    assert 0 < info["kept_energy"] <= 1
    return gm


def test_slicing_equals_zeroing_the_dropped_dimensions(tiny_gm: GraphModel, tokens: torch.Tensor) -> None:
    _check_slice_matches_zeroing(_rotated(tiny_gm), tokens)


def test_slicing_a_stream_read_without_norms_equals_zeroing(tokens: torch.Tensor) -> None:
    """OLMo2 normalises block outputs, not inputs: q/k/v and gate/up read the stream itself.
    They are rotated like any reader and sliced without a norm's rescaling (a rescaled direct
    reader would break the equality with zeroing)."""
    from graphprune.models.zoo import zoo_model

    gm = GraphModel.capture(zoo_model("olmo2"), name="tiny-olmo2")
    reference = gm(tokens)
    gm = _rotated(gm)
    assert relative_diff(gm(tokens), reference) <= 1e-4
    stream = find_stream(gm)
    direct = {li.name.split(".", 3)[-1] for dr in stream.direct for li in dr.readers}
    assert len(stream.direct) == 4 and direct == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
    assert [sn.norm.name for sn in stream.norms] == ["model.norm"]  # the only norm on the stream: the final one
    _check_slice_matches_zeroing(gm, tokens)


def test_slicing_moe_experts_equals_zeroing(tokens: torch.Tensor) -> None:
    """Qwen2-MoE: routed experts read the normed stream through a row gather and write it
    through per-token weights and a sum over the chosen experts, beside a gated shared
    expert. Rotation passes through every expert (the router, a reader, keeps its choices)
    and slicing cuts each batched weight along the stream's axis."""
    from graphprune.models.zoo import zoo_model

    gm = GraphModel.capture(zoo_model("qwen2_moe"), name="tiny-qwen2_moe")
    reference = gm(tokens)
    gm = _rotated(gm)
    assert relative_diff(gm(tokens), reference) <= 1e-4
    stream = find_stream(gm)
    assert len(stream.expert_readers) == len(stream.expert_writers) == 2 * 4  # 4 experts in each of 2 blocks
    assert {li.name.rsplit(".", 1)[-1] for li in stream.writers} == {"o_proj", "down_proj"}  # the shared expert's
    sliced = _check_slice_matches_zeroing(gm, tokens)
    assert tuple(sliced.model.model.layers[0].mlp.experts.gate_up_proj.shape) == (4, 64, sliced_width(64, 0.25))


def test_slicing_unties_a_head_that_folding_left_tied(tiny_gm: GraphModel, tiny_name: str, tokens: torch.Tensor) -> None:
    if tiny_name != "tiny-llama":
        pytest.skip("only the LLaMA model ties its head")
    with torch.no_grad():
        tiny_gm.model.model.norm.weight.fill_(1.0)  # nothing to fold into the head: it stays tied
    gm = _rotated(tiny_gm)
    assert gm.model.lm_head.weight is gm.model.model.embed_tokens.weight
    gm = _check_slice_matches_zeroing(gm, tokens)  # the head's columns are rescaled, the table's not
    assert gm.model.lm_head.weight is not gm.model.model.embed_tokens.weight


def test_slicing_needs_an_ordered_rotation(tiny_gm: GraphModel) -> None:
    gm = _rotated(tiny_gm, "hadamard")
    with pytest.raises(ConfigError, match="ordered by importance"):
        SlicePass(0.25).run(gm, _ctx())


def test_sliced_model_saves_loads_and_evaluates(tmp_path, tokens: torch.Tensor) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 120)
    out = tmp_path / "sliced"
    job = PruneJob(model="tiny-llama", slicing=0.25, calib_samples=6, calib_len=32, text=[str(text)], out=str(out), evaluate=True, eval_len=64)
    outcome = run_prune(job, progress=False)
    rep = outcome.report
    assert rep["method"] == "none" and rep["slicing"]["sliced_width"] == 48
    assert rep["parameters_after"] < rep["parameters_before"] and rep["ppl"] > 0
    reloaded = load_model(str(out))
    assert reloaded.model.config.hidden_size == 48 and reloaded.model.config.head_dim == 16
    assert parameter_count(reloaded.model) == rep["parameters_after"]
    with torch.no_grad():
        again = reloaded.model(input_ids=tokens).logits
    assert relative_diff(again, outcome.gm(tokens)) <= 1e-4


def test_sliced_layernorm_model_is_refused_for_saving(tmp_path) -> None:
    job = PruneJob(model="tiny-opt", slicing=0.25, calib_samples=4, calib_len=32, out=str(tmp_path / "x"))
    with pytest.raises(ExportError, match="LayerNorm"):
        run_prune(job, progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="ordered by importance"):
        run_prune(PruneJob(model="tiny-llama", rotation="hadamard", slicing=0.3), progress=False)


def test_cli_refuses_slicing_a_hadamard_rotation(capsys) -> None:
    from graphprune.cli import main

    assert main(["prune", "--model", "tiny-llama", "--rotate", "hadamard", "--slice", "0.3", "-q"]) == 2
    assert "ordered by importance" in capsys.readouterr().err
    assert main(["prune", "--model", "tiny-llama", "--rotate", "learned", "-q"]) == 2  # learned needs a target
    assert "sparsity target" in capsys.readouterr().err
