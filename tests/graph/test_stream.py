"""Residual-stream discovery finds every embedding, reader, writer and norm from the graph alone."""
from __future__ import annotations

import networkx as nx
import pytest
import torch

from graphprune.errors import ConfigError
from graphprune.graph.edit import parameter_count, replace_parameter
from graphprune.graph.model import GraphModel
from graphprune.graph.stream import find_stream


def _suffixes(tiny_name: str) -> tuple[set[str], set[str]]:
    """Reader and writer Linear names by module structure (what each architecture's code does)."""
    if tiny_name == "tiny-llama":
        return {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}, {"self_attn.o_proj", "mlp.down_proj"}
    return {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"}, {"self_attn.out_proj", "fc2"}


def test_finds_every_reader_writer_and_embedding(tiny_gm: GraphModel, tiny_name: str) -> None:
    stream = find_stream(tiny_gm)
    model = tiny_gm.model
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    read_sfx, write_sfx = _suffixes(tiny_name)
    expected_readers = {n for n in linears if any(n.endswith(s) for s in read_sfx)} | {"lm_head"}
    expected_writers = {n for n in linears if any(n.endswith(s) for s in write_sfx)}
    assert {li.name for li in stream.readers} == expected_readers
    assert {li.name for li in stream.writers} == expected_writers
    assert expected_readers | expected_writers == linears  # every Linear touches the stream in these models
    embeddings = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    found = {
        name for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Embedding) and any(tiny_gm.get_attr(t) is mod.weight for _, t in stream.embeddings)
    }
    assert found == embeddings  # tokens (and OPT's learned positions)
    assert stream.width == model.config.hidden_size
    assert len(stream.norms) == 2 * model.config.num_hidden_layers + 1
    assert stream.final_norm is not None and [li.name for li in stream.final_norm.readers] == ["lm_head"]
    assert stream.lm_head is not None and stream.lm_head.name == "lm_head"


def test_stream_is_a_chain_through_the_residual_adds(tiny_gm: GraphModel) -> None:
    stream = find_stream(tiny_gm)
    g = tiny_gm.networkx()
    adds = [n for n in stream.nodes if n.target is torch.ops.aten.add.Tensor]
    # one residual add per writer, plus OPT's token + position add
    assert len(adds) in (len(stream.writers), len(stream.writers) + 1)
    for a, b in zip(adds, adds[1:]):
        assert nx.has_path(g, a.name, b.name)
    for li in stream.writers:  # every writer reaches the final norm's input
        assert nx.has_path(g, li.node.name, stream.final_norm.norm.input.name)


def test_unsupported_stream_reader_is_refused(tiny_gm: GraphModel) -> None:
    graph = tiny_gm.gm.graph
    stream = find_stream(tiny_gm)
    value = stream.nodes[2]
    with graph.inserting_after(value):
        odd = graph.call_function(torch.ops.aten.sin.default, (value,))
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        graph.call_function(torch.ops.aten.add.Tensor, (odd, 1.0))
    tiny_gm.invalidate()
    with pytest.raises(ConfigError, match="outside a norm"):
        find_stream(tiny_gm)


def test_replace_parameter_changes_both_trees(tiny_gm: GraphModel) -> None:
    li = tiny_gm.block_linears()[0]
    before = parameter_count(tiny_gm.model)
    new = replace_parameter(tiny_gm, li.weight, tiny_gm.get_attr(li.weight)[:, :8])
    mod = tiny_gm.model.get_submodule(li.name)
    assert mod.weight is new and tiny_gm.get_attr(li.weight) is new and mod.in_features == 8
    assert parameter_count(tiny_gm.model) == before - li.out_features * (li.in_features - 8)
