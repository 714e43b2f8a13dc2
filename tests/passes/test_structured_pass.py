"""Structured pruning of MLP channels: groups found from the dataflow, physical removal that
keeps graph and model one program, uniform widths that transformers reloads, exports."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from graphprune.errors import ConfigError
from graphprune.exporters.hf import save_hf_folder
from graphprune.graph.model import GraphModel
from graphprune.graph.structures import find_channel_groups, find_head_groups
from graphprune.models.loader import ByteTokenizer
from graphprune.models.tiny import random_tokens
from graphprune.passes.infra import PassContext, PassManager
from graphprune.passes.structured import kept_width, structured_pass

EXPECTED = {
    "tiny-llama": [("model.layers.{i}.mlp.down_proj", {"model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"})],
    "tiny-opt": [("model.decoder.layers.{i}.fc2", {"model.decoder.layers.{i}.fc1"})],
}


def _ctx() -> PassContext:
    return PassContext(progress=False, calibration=random_tokens(8, 32, seed=3))


def test_channel_groups_come_from_the_dataflow(tiny_name: str, tiny_gm: GraphModel) -> None:
    """Exactly the MLPs: the consumer and its producers; attention's o_proj (fed through a
    reshape of the attention output) and q/k/v are not channel groups."""
    groups = find_channel_groups(tiny_gm)
    want = [(c.format(i=i), {p.format(i=i) for p in ps}) for i in range(2) for c, ps in EXPECTED[tiny_name]]
    assert [(g.consumer.name, {p.name for p in g.producers}) for g in groups] == want
    assert [g.block for g in groups] == [0, 1]
    assert all(g.width == 128 for g in groups)


def test_a_value_read_outside_the_group_blocks_it(tiny_gm: GraphModel) -> None:
    """If a producer's output also feeds something else, its rows cannot go: no group."""
    gm = tiny_gm
    first = find_channel_groups(gm)[0]
    producer = first.producers[0].node
    graph = gm.gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        extra = graph.call_function(torch.ops.aten.sum.default, (producer,))
    extra.meta = dict(producer.meta)
    gm.invalidate()
    assert first.consumer.name not in [g.consumer.name for g in find_channel_groups(gm)]


@pytest.mark.parametrize("method", ["obs", "wanda-sp"])
def test_structured_pruning_shrinks_the_model_and_graph_and_model_agree(tiny_name: str, tiny_gm: GraphModel, method: str) -> None:
    gm = tiny_gm
    groups = find_channel_groups(gm)
    block_params = sum(li.out_features * li.in_features for li in gm.blocks[0].linears)
    keep = kept_width(groups[0], 0.25, block_params)
    tokens = random_tokens(3, 16, seed=1)
    dense = gm(tokens)
    gm = PassManager([structured_pass(0.25, method)], _ctx()).run(gm)
    rep = gm.state.structured
    assert rep is not None and [e["kept"] for e in rep["layers"]] == [keep, keep] and keep % 8 == 0
    assert rep["block_parameters_removed"] == pytest.approx(0.25, abs=0.03)
    for g in groups:
        assert tuple(gm.get_attr(g.consumer.weight).shape) == (g.consumer.out_features, keep)
        for p in g.producers:
            assert gm.get_attr(p.weight).shape[0] == keep
            module = gm.model.get_submodule(p.name)
            assert module.out_features == keep
    pruned = gm(tokens)
    hf = gm.model(input_ids=tokens, use_cache=False).logits
    torch.testing.assert_close(pruned, hf, rtol=0, atol=0)
    assert not torch.allclose(pruned, dense)


def test_obs_reconstructs_better_than_wanda_sp_layer_by_layer(tiny_gm: GraphModel) -> None:
    """Same calibration, same widths: structured OBS's reconstruction error of every down
    projection is below Wanda-sp's (the first block sees identical inputs in both runs)."""
    a, b = tiny_gm, tiny_gm.clone()
    a = PassManager([structured_pass(0.3, "obs")], _ctx()).run(a)
    b = PassManager([structured_pass(0.3, "wanda-sp")], _ctx()).run(b)
    obs, sp = a.state.structured["layers"], b.state.structured["layers"]
    assert obs[0]["rel_error"] < sp[0]["rel_error"]
    assert all(o["rel_error"] < s["rel_error"] for o, s in zip(obs, sp, strict=True))


def test_a_uniform_structured_model_reloads_in_transformers(tiny_name: str, tiny_gm: GraphModel, tmp_path) -> None:
    gm = PassManager([structured_pass(0.25, "obs")], _ctx()).run(tiny_gm)
    tokens = random_tokens(2, 12, seed=5)
    want = gm(tokens)
    save_hf_folder(gm.model, ByteTokenizer(), tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()  # transformers alone
    got = again(input_ids=tokens, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    width = {"tiny-llama": "intermediate_size", "tiny-opt": "ffn_dim"}[tiny_name]
    assert getattr(again.config, width) == gm.state.structured["layers"][0]["kept"]


def test_too_much_is_refused(tiny_gm: GraphModel) -> None:
    with pytest.raises(ConfigError, match="Lower --structured"):
        PassManager([structured_pass(0.9, "obs")], _ctx()).run(tiny_gm)
    with pytest.raises(ConfigError, match="unknown structured method"):
        structured_pass(0.2, "nope")


def test_cli_structured_alone_and_with_sparsity_then_exports(tmp_path, capsys) -> None:
    """`prune --structured` alone writes a smaller folder; with --sparsity the remaining
    weights are 50 % sparse, and the folder loads in transformers with the new width."""
    import json

    from graphprune.cli import main

    common = ["--model", "tiny-llama", "--calib-samples", "4", "--calib-len", "64", "-q"]
    assert main(["prune", *common, "--structured", "0.25", "--out", str(tmp_path / "s")]) == 0
    assert "structured obs" in capsys.readouterr().out
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["method"] == "none" and rep["parameters_after"] < rep["parameters_before"]
    assert main(["prune", *common, "--structured", "0.25", "--structured-method", "wanda-sp", "--method", "sparsegpt", "--sparsity", "0.5",
                 "--out", str(tmp_path / "sp")]) == 0
    rep = json.loads((tmp_path / "sp" / "report.json").read_text())
    assert rep["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3) and rep["structured"]["method"] == "wanda-sp"
    kept = rep["structured"]["layers"][0]["kept"]
    down = next(e for e in rep["layers"] if e["name"].endswith("down_proj"))
    assert down["shape"][1] == kept
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sp")).eval()  # uniform: transformers alone loads it
    assert model.config.intermediate_size == kept
    assert main(["prune", *common, "--structured", "0.3", "--structured-units", "mlp+kv-groups", "--out", str(tmp_path / "h")]) == 0
    assert "heads 4/2 -> 2/1 (query/KV)" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "h")).eval()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)
    assert main(["prune", *common, "--structured", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "--structured is a fraction" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_flap_compensates_in_a_bias_and_the_folder_reloads(tmp_path) -> None:
    """FLAP on a bias-less LLaMA: zero MLP biases are added (function unchanged), the removed
    channels' mean output lands in down_proj's bias, and transformers reloads the folder."""
    from graphprune.models.tiny import tiny_llama

    gm = GraphModel.capture(tiny_llama(), name="tiny-llama")
    gm = PassManager([structured_pass(0.25, "flap")], _ctx()).run(gm)
    down = gm.model.model.layers[0].mlp.down_proj
    assert down.bias is not None and float(down.bias.abs().max()) > 0
    assert gm.model.config.mlp_bias is True
    tokens = random_tokens(2, 12, seed=5)
    want = gm(tokens)
    torch.testing.assert_close(gm.model(input_ids=tokens, use_cache=False).logits, want, rtol=0, atol=0)
    save_hf_folder(gm.model, ByteTokenizer(), tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    torch.testing.assert_close(again(input_ids=tokens, use_cache=False).logits, want, rtol=0, atol=1e-6)


def test_adaptive_widths_follow_importance_and_the_folder_loads_through_graphprune(tmp_path) -> None:
    """Half of block 0's MLP channels are dead (zero down_proj columns): the adaptive budget
    removes them first, so block 0 ends narrower than block 1; the total stays on budget.
    The folder records the widths; graphprune loads it exactly and exports it for generation
    (ONNX and TorchScript, checked against eager); transformers alone refuses it."""
    from graphprune.exporters.generation import export_generation
    from graphprune.models import load_model
    from graphprune.models.shapes import SHAPES_FILE
    from graphprune.models.tiny import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, ::2] = 0.0
    gm = GraphModel.capture(model, name="tiny-llama")
    blocks = sum(li.out_features * li.in_features for b in gm.blocks for li in b.linears)
    gm = PassManager([structured_pass(0.2, "obs", budget="adaptive")], _ctx()).run(gm)
    rep = gm.state.structured
    widths = [e["kept"] for e in rep["layers"]]
    assert rep["budget"] == "adaptive" and widths[0] < widths[1] and all(w % 8 == 0 for w in widths)
    assert rep["block_parameters_removed"] == pytest.approx(0.2, abs=0.04) and blocks > 0
    tokens = random_tokens(2, 12, seed=5)
    want = gm(tokens)
    save_hf_folder(gm.model, ByteTokenizer(), tmp_path / "m")
    assert (tmp_path / "m" / SHAPES_FILE).is_file()
    again = load_model(str(tmp_path / "m")).model
    torch.testing.assert_close(again(input_ids=tokens, use_cache=False).logits, want, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="ignore_mismatched_sizes|size mismatch"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    for fmt in ("onnx", "torchscript"):
        out = export_generation(again, tmp_path / f"gen-{fmt}", format=fmt, tokenizer=ByteTokenizer(), check_tokens=8)
        assert out.tokens_equal and out.max_abs_diff is not None and out.max_abs_diff < 1e-4


# ---- attention heads ----

HEADS = {
    # name: (heads, kv heads, query projection, output projection)
    "tiny-llama": (4, 2, "model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.o_proj"),
    "tiny-opt": (4, 4, "model.decoder.layers.{i}.self_attn.q_proj", "model.decoder.layers.{i}.self_attn.out_proj"),
}


def test_head_groups_come_from_the_dataflow(tiny_name: str, tiny_gm: GraphModel) -> None:
    """Each attention: q/k/v feeding the fused attention, the output projection after it,
    head counts from the shapes, and the shape constants that spell a head count (LLaMA's
    grouped-query repeat, OPT's head split)."""
    heads, kv, qname, oname = HEADS[tiny_name]
    groups = find_head_groups(tiny_gm)
    assert [(g.query.name, g.consumer.name) for g in groups] == [(qname.format(i=i), oname.format(i=i)) for i in range(2)]
    assert all((g.heads, g.kv_heads, g.head_dim) == (heads, kv, 16) for g in groups)
    whats = sorted({w for g in groups for _n, _i, w in g.edits})
    assert whats == (["kv", "q", "rep"] if kv < heads else ["kv", "q"])


@pytest.mark.parametrize("units", ["heads", "kv-groups", "mlp+heads"])
def test_head_pruning_shrinks_attention_and_graph_and_model_agree(tiny_name: str, tiny_gm: GraphModel, units: str) -> None:
    """Removed heads leave the query (and for KV groups the key/value) rows and the output
    projection's columns; each KV group keeps as many query heads; the pruned graph and the
    edited transformers module compute the same logits; a LLaMA config states the new counts."""
    heads, kv, _q, _o = HEADS[tiny_name]
    gm = tiny_gm
    tokens = random_tokens(3, 16, seed=1)
    dense = gm(tokens)
    fraction = 0.3 if units.startswith("mlp") else 0.12
    gm = PassManager([structured_pass(fraction, "obs", units=units)], _ctx()).run(gm)
    rep = gm.state.structured
    entries = [e for e in rep["layers"] if e["kind"] == "heads"]
    assert len(entries) == 2 and rep["unit"] == units
    for e, g in zip(entries, find_head_groups(gm), strict=True):
        nq, nkv = len(e["kept_heads"]), len(e["kept_kv_heads"])
        assert nq < heads and nq % nkv == 0
        if units == "kv-groups" or kv == heads:
            assert nkv < kv and e["kept_heads"] == [k * (heads // kv) + r for k in e["kept_kv_heads"] for r in range(heads // kv)]
        else:  # query heads within KV groups: every group keeps the same number
            assert nkv == kv and sorted(h // (heads // kv) for h in e["kept_heads"]) == sorted(list(range(kv)) * (nq // kv))
        assert (g.heads, g.kv_heads) == (nq, nkv)
        assert tuple(gm.get_attr(g.query.weight).shape) == (nq * 16, 64)
        assert tuple(gm.get_attr(g.key.weight).shape) == (nkv * 16, 64)
        assert tuple(gm.get_attr(g.consumer.weight).shape) == (64, nq * 16)
    pruned = gm(tokens)
    torch.testing.assert_close(gm.model(input_ids=tokens, use_cache=False).logits, pruned, rtol=0, atol=0)
    assert not torch.allclose(pruned, dense)
    if tiny_name == "tiny-llama":
        cfg = gm.model.config
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (nq, nkv, 16)


def test_head_pruned_folders_reload_and_export(tiny_name: str, tiny_gm: GraphModel, tmp_path) -> None:
    """LLaMA (config with head_dim): transformers alone reloads the folder with identical logits.
    OPT (head size derived from hidden_size): the folder records the attention modules' head
    counts, graphprune reloads it exactly, transformers alone refuses it. Both export for
    generation to ONNX and TorchScript with the same tokens as eager."""
    from graphprune.exporters.generation import export_generation
    from graphprune.models import load_model
    from graphprune.models.shapes import SHAPES_FILE

    gm = PassManager([structured_pass(0.3, "obs", units="mlp+heads")], _ctx()).run(tiny_gm)
    tokens = random_tokens(2, 12, seed=5)
    want = gm(tokens)
    save_hf_folder(gm.model, ByteTokenizer(), tmp_path / "m")
    if tiny_name == "tiny-llama":
        assert not (tmp_path / "m" / SHAPES_FILE).exists()
        again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    else:
        import json

        recorded = json.loads((tmp_path / "m" / SHAPES_FILE).read_text())
        assert recorded["attributes"]["model.decoder.layers.0.self_attn"] == {"num_heads": 3}
        with pytest.raises(Exception, match="ignore_mismatched_sizes|size mismatch"):
            AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
        again = load_model(str(tmp_path / "m")).model
    torch.testing.assert_close(again(input_ids=tokens, use_cache=False).logits, want, rtol=0, atol=1e-6)
    for fmt in ("onnx", "torchscript"):
        out = export_generation(again, tmp_path / f"gen-{fmt}", format=fmt, tokenizer=ByteTokenizer(), check_tokens=8)
        assert out.tokens_equal and out.max_abs_diff is not None and out.max_abs_diff < 1e-4


def test_obs_reconstructs_heads_better_than_wanda_sp(tiny_gm: GraphModel) -> None:
    """Same calibration, same head counts: structured OBS's reconstruction error of every
    output projection is below Wanda-sp's."""
    a, b = tiny_gm, tiny_gm.clone()
    a = PassManager([structured_pass(0.12, "obs", units="heads")], _ctx()).run(a)
    b = PassManager([structured_pass(0.12, "wanda-sp", units="heads")], _ctx()).run(b)
    obs, sp = a.state.structured["layers"], b.state.structured["layers"]
    assert all(o["rel_error"] < s["rel_error"] for o, s in zip(obs, sp, strict=True))


def test_head_budgets_that_cannot_be_met_are_refused(tiny_gm: GraphModel) -> None:
    with pytest.raises(ConfigError, match="mlp\\+heads"):
        PassManager([structured_pass(0.6, "obs", units="heads")], _ctx()).run(tiny_gm)
    with pytest.raises(ConfigError, match="is not one of"):
        structured_pass(0.2, "obs", units="heads+kv-groups")
