"""The query layer finds every Linear, norm and block from the graph alone."""
from __future__ import annotations

import networkx as nx
import torch

from graphprune.graph import queries as q
from graphprune.graph.model import GraphModel


def _modules_of(model: torch.nn.Module, kind: type | tuple[type, ...]) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, kind)}


def test_finds_every_linear(tiny_model: torch.nn.Module) -> None:
    gm = GraphModel.capture(tiny_model)
    assert {li.name for li in gm.linears} == _modules_of(tiny_model, torch.nn.Linear)
    for li in gm.linears:
        mod = tiny_model.get_submodule(li.name)
        assert (li.out_features, li.in_features) == tuple(mod.weight.shape)
        assert (li.bias is None) == (mod.bias is None)


def test_finds_every_norm_and_block(tiny_model: torch.nn.Module) -> None:
    gm = GraphModel.capture(tiny_model)
    norm_modules = {n for n, m in tiny_model.named_modules() if "Norm" in type(m).__name__}
    assert {n.name for n in gm.norms} == norm_modules
    layers = {n for n, m in tiny_model.named_modules() if type(m).__name__.endswith("DecoderLayer")}
    assert [b.name for b in gm.blocks] == sorted(layers, key=lambda s: int(s.rsplit(".", 1)[1]))
    for b in gm.blocks:
        assert {li.name for li in b.linears} == {n for n in _modules_of(tiny_model, torch.nn.Linear) if n.startswith(b.name + ".")}
        assert len(b.norms) == 2
    # the final norm is outside the blocks; the LM head is the last Linear
    assert sum(n.block is None for n in gm.norms) == 1
    assert gm.lm_head is not None and gm.lm_head.name == "lm_head" and gm.lm_head.block is None


def test_shared_inputs(tiny_model: torch.nn.Module, tiny_name: str) -> None:
    gm = GraphModel.capture(tiny_model)
    groups = [sorted(li.name.rsplit(".", 1)[1] for li in g) for g in q.group_by_input(gm.block_linears()).values()]
    assert ["k_proj", "q_proj", "v_proj"] in groups
    if tiny_name == "tiny-llama":
        assert ["gate_proj", "up_proj"] in groups and len(groups) == 2 * 4
    else:
        assert len(groups) == 2 * 4  # qkv, out_proj, fc1, fc2


def test_networkx_view_is_the_dataflow(tiny_model: torch.nn.Module) -> None:
    gm = GraphModel.capture(tiny_model)
    g = gm.networkx()
    assert nx.is_directed_acyclic_graph(g)
    assert g.number_of_nodes() == len(gm.gm.graph.nodes)
    emb = gm.embedding[0].name
    for li in gm.linears:  # every Linear depends on the embedding lookup
        assert nx.has_path(g, emb, li.node.name)
