"""Every architecture family of the zoo (graphprune.models.zoo) through capture, one solver, a
rotation and an export, on its 2-layer, 64-wide tiny model.

The full capability matrix (every solver, 2:4, every rotation, slicing, kernels, ONNX) is
``benchmarks/zoo_matrix.py``, whose results feed the README's support table. Here, a family
the rotation does not support yet (``support.GAPS``) must fail with a clear error that names
the model, and a MoE family's experts must be pruned one by one while its routers stay dense.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graphprune.errors import GraphPruneError
from graphprune.exporters.hf import save_hf_folder
from graphprune.graph.model import GraphModel
from graphprune.graph.stream import find_stream
from graphprune.models import load_model
from graphprune.models.loader import ByteTokenizer
from graphprune.models.tiny import random_tokens
from graphprune.models.zoo import FAMILIES, ZOO
from graphprune.passes.fold_norms import FoldNormsPass
from graphprune.passes.infra import PassContext, PassManager, relative_diff
from graphprune.passes.observe import InsertObserversPass
from graphprune.passes.prune import PruneConfig, SequentialPrunePass
from graphprune.passes.rotate import RotatePass
from graphprune.pipeline.support import GAPS
from graphprune.solvers import SparsitySpec

NAMES = [f.name for f in FAMILIES]
IDS = random_tokens(2, 12, seed=5)


@pytest.fixture(scope="module", params=NAMES)
def captured(request: pytest.FixtureRequest) -> tuple[str, GraphModel, torch.Tensor]:
    name = request.param
    model = ZOO[name].build()
    with torch.no_grad():
        reference = model(input_ids=IDS, use_cache=False).logits
    return name, GraphModel.capture(model, name=f"tiny-{name}"), reference


def test_capture_computes_the_models_logits(captured) -> None:
    name, gm, reference = captured
    assert relative_diff(gm(IDS), reference) <= 1e-5
    assert gm.block_linears(), name
    assert {li.block for li in gm.block_linears()} == {0, 1}


def test_wanda_prunes_every_block_matrix_and_the_folder_reloads(captured, tmp_path: Path) -> None:
    name, base, _ = captured
    gm = base.clone()
    ctx = PassContext(progress=False, calibration=random_tokens(4, 24, seed=3))
    gm = PassManager([InsertObserversPass(), SequentialPrunePass(PruneConfig("wanda", SparsitySpec(0.5), batch_size=2))], ctx).run(gm)
    report = gm.state.prune_report
    matrices = gm.block_matrices()
    routers = {li.param_name for li in gm.routers}
    skipped = {e["name"]: e for e in report["not_pruned"]}
    assert set(skipped) <= set(matrices) and routers <= set(skipped)
    for pname in routers:  # routers score experts: kept dense
        assert not bool((matrices[pname] == 0).any())
    zeros = total = 0
    for pname, w in matrices.items():
        zeros += int((w == 0).sum())
        total += w.numel()
        if pname not in skipped:
            assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02), pname
    # the achieved sparsity counts every matrix of the blocks, pruned or not
    assert report["achieved_sparsity"] == pytest.approx(zeros / total, abs=1e-3)
    assert set(skipped) == routers
    if ZOO[name].moe:
        assert len(routers) == 2  # one router per block, found from the graph (it feeds a top-k)
        # every expert of the batched weights pruned on its own, each row to the target
        experts = [e for e in gm.experts]
        assert len({e.param_name for e in experts}) == 4 and len(experts) == 16
        for e in experts:
            assert ((gm.matrix(e) == 0).sum(1) == e.in_features // 2).all(), e.name
        assert {e.name for e in experts} <= {entry["name"] for entry in report["layers"]}
    else:
        assert not routers
    save_hf_folder(gm.model, ByteTokenizer(), tmp_path / "out")
    reloaded = load_model(str(tmp_path / "out")).model
    with torch.no_grad():
        again = reloaded(input_ids=IDS, use_cache=False).logits
    assert relative_diff(again, gm(IDS)) <= 1e-5


def test_pca_rotation_keeps_the_logits_or_names_the_gap(captured) -> None:
    name, base, reference = captured
    gm = base.clone()
    pm = PassManager([FoldNormsPass(), RotatePass("pca")], PassContext(progress=False, calibration=random_tokens(4, 24, seed=3)))
    gap = GAPS.get((name, "pca"))
    if gap is None:
        gm = pm.run(gm)
        assert relative_diff(gm(IDS), reference) <= 1e-4
        if name in ("gemma2", "gemma3"):  # post-block norms: one dense adapter each, and the folder is graph-only
            assert len(gm.state.adapters) == 4 and not set(gm.state.adapters) & {li.name for li in gm.block_linears()}
            assert any("adapter" in reason for reason in gm.state.export_blockers)
        if name == "bloom":  # the embedding LayerNorm: an adapter starts the stream, the head is untied
            assert gm.state.adapters == ["transformer.word_embeddings_layernorm"]
            assert gm.get_attr(gm.lm_head.weight) is not gm.model.get_input_embeddings().weight
            stream = find_stream(gm)
            assert not stream.embeddings and len(stream.normed_embeddings) == 1 and stream.width == 64
    else:  # a known gap: a clear error naming the model, nothing changed
        with pytest.raises(GraphPruneError, match=f"tiny-{name}"):
            pm.run(gm)
        assert relative_diff(gm(IDS), reference) <= 1e-6


def test_torchscript_file_matches(captured, tmp_path: Path) -> None:
    from graphprune.exporters import export_torchscript

    name, gm, reference = captured
    if (name, "torchscript") in GAPS:  # a known gap: the exporter says so, and writes nothing
        with pytest.raises(GraphPruneError):
            export_torchscript(gm.model, tmp_path / f"{name}.pt", check=False)
        assert not (tmp_path / f"{name}.pt").exists()
        return
    report = export_torchscript(gm.model, tmp_path / f"{name}.pt", check=False)
    loaded = torch.jit.load(str(report.path))
    with torch.no_grad():
        out = loaded(IDS)
    assert relative_diff(out, reference) <= 1e-5
