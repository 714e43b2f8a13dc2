"""FoldNormsPass: norm scales and biases move into the Linears; LayerNorm becomes RMSNorm by centring."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from graphprune.graph.edit import export_blockers
from graphprune.graph.model import GraphModel
from graphprune.graph.stream import find_stream
from graphprune.passes.fold_norms import FoldNormsPass
from graphprune.passes.infra import PassContext, PassManager, Prop, relative_diff


def _fold(gm: GraphModel) -> GraphModel:
    return PassManager([FoldNormsPass()], PassContext(progress=False)).run(gm)  # the manager checks logits too


def _hf_logits(gm: GraphModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gm.model(input_ids=ids, use_cache=False).logits


def test_folding_preserves_logits_and_leaves_unit_norms(tiny_gm: GraphModel, tiny_name: str, tokens: torch.Tensor) -> None:
    before = tiny_gm(tokens)
    gm = _fold(tiny_gm)
    assert Prop.NORMS_FOLDED in gm.props
    assert relative_diff(gm(tokens), before) <= 1e-4
    stream = find_stream(gm)
    assert stream.kinds == {"rmsnorm"}
    for sn in stream.norms:
        if sn.norm.weight is not None:
            assert bool((gm.get_attr(sn.norm.weight) == 1).all())
    # the in-memory Hugging Face model computes the same: for OPT its LayerNorms (weight 1,
    # bias 0) on the centred stream equal the graph's RMSNorms
    assert relative_diff(_hf_logits(gm, tokens), before) <= 1e-4
    for mod in gm.model.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            assert bool((mod.weight == 1).all()) and not mod.bias.any()


def test_layernorm_stream_is_centred(tiny_gm: GraphModel, tiny_name: str) -> None:
    gm = _fold(tiny_gm)
    if tiny_name != "tiny-opt":
        assert not gm.state.stream_centred
        return
    stream = find_stream(gm)
    for _, target in stream.embeddings:
        assert gm.get_attr(target).mean(1).abs().max() < 1e-6
    for li in stream.writers:
        assert gm.get_attr(li.weight).mean(0).abs().max() < 1e-6
        assert abs(float(gm.get_attr(li.bias).detach().mean())) < 1e-6
    assert not any(n.target is torch.ops.aten.layer_norm.default for n in gm.gm.graph.nodes)
    # the final LayerNorm's bias became an LM-head bias that transformers' OPT cannot load
    assert gm.lm_head.bias is not None
    assert any("lm_head" in b for b in export_blockers(gm))


def test_tied_head_is_untied_and_saved_model_reproduces_the_graph(tiny_gm: GraphModel, tiny_name: str, tmp_path, tokens: torch.Tensor) -> None:
    if tiny_name != "tiny-llama":
        pytest.skip("only the LLaMA model ties its head")
    model, gm = tiny_gm.model, tiny_gm
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = gm(tokens)
    gm = _fold(gm)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    g = model.model.norm.weight  # folded: ones; the head carries the old scale
    assert bool((g == 1).all())
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(input_ids=tokens).logits
    assert relative_diff(again, before) <= 1e-4
    assert not export_blockers(gm)
