"""Lazy (stage-at-a-time) pruning gives the in-memory result while holding one block at a time."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from graphprune.cli import main
from graphprune.errors import ConfigError, ModelLoadError
from graphprune.graph.lazy import LazyStageIO, LazyWeights, retarget_meta
from graphprune.graph.model import GraphModel
from graphprune.models.lazy import load_lazy
from graphprune.pipeline import PruneJob, run_prune


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lazy") / "tiny-llama"
    assert main(["convert", "--model", "tiny-llama", "--out", str(out), "-q"]) == 0
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _job(model: Path, out: Path, lazy: bool, method: str = "sparsegpt") -> PruneJob:
    return PruneJob(model=str(model), method=method, sparsity=0.5, calib_samples=8, calib_len=32, batch_size=4,
                    out=str(out), lazy=lazy)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_lazy_equals_in_memory(folder: Path, tmp_path: Path, method: str) -> None:
    run_prune(_job(folder, tmp_path / "eager", False, method), progress=False)
    outcome = run_prune(_job(folder, tmp_path / "lazy", True, method), progress=False)
    eager, lazy = _weights(tmp_path / "eager"), _weights(tmp_path / "lazy")
    assert set(eager) == set(lazy)
    for name in eager:
        assert torch.equal(eager[name], lazy[name]), name
    # one shard per block plus one for the embedding, final norm and LM head, with an index
    index = json.loads((tmp_path / "lazy" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(outcome.gm.blocks) + 1
    # every parameter is back on the meta device once written
    assert all(p.device.type == "meta" for n, p in outcome.loaded.model.named_parameters() if ".layers." in n)

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "eager")).eval()
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lazy")).eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_only_one_block_is_materialised_at_a_time(folder: Path, tmp_path: Path) -> None:
    loaded, source = load_lazy(str(folder))
    gm = GraphModel.capture(loaded.model)
    assert retarget_meta(gm) > 0  # the meta skeleton baked its device into the graph
    weights = LazyWeights(gm, source.get)
    seen: list[int] = []

    class Probe(LazyStageIO):
        def enter(self, block: int, roots: list[torch.nn.Module]) -> None:
            super().enter(block, roots)
            live = [n for n, p in gm.model.named_parameters() if p.device.type != "meta" and ".layers." in n]
            assert live and all(n.startswith(f"model.layers.{block}.") for n in live)
            seen.append(block)

    from graphprune.passes.infra import PassContext, PassManager
    from graphprune.passes.observe import InsertObserversPass, RemoveObserversPass
    from graphprune.passes.prune import PruneConfig, SequentialPrunePass
    from graphprune.solvers import SparsitySpec

    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    io = Probe(weights, writer=None)
    passes = [InsertObserversPass(), SequentialPrunePass(PruneConfig("wanda", SparsitySpec(0.5)), stage_io=io), RemoveObserversPass()]
    PassManager(passes, PassContext(verify=False, progress=False, calibration=calib)).run(gm)
    assert seen == list(range(len(gm.blocks)))
    shared = sum(p.numel() * 4 for n, p in gm.model.named_parameters() if n in weights.shared)
    block = max(sum(gm.model.get_parameter(n).numel() * 4 for n in names) for names in weights.by_block)
    assert io.peak_bytes == shared + block


def test_lazy_refuses_what_it_cannot_do(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="graphprune convert"):
        run_prune(PruneJob(model="tiny-llama", sparsity=0.5, out=str(tmp_path / "x"), lazy=True), progress=False)
    for bad, match in [
        ({"evaluate": True}, "graphprune eval"),
        ({"rotation": "pca"}, "without --lazy"),
        ({"method": "gblm"}, "without --lazy"),
        ({"out": None}, "--out"),
    ]:
        job = _job(folder, tmp_path / "y", True)
        for key, value in bad.items():
            setattr(job, key, value)
        with pytest.raises(ConfigError, match=match):
            run_prune(job, progress=False)
    assert not (tmp_path / "y").exists()


def test_a_failed_lazy_run_leaves_no_folder(folder: Path, tmp_path: Path) -> None:
    job = _job(folder, tmp_path / "z", True)
    job.options = {"blocksize": -3}  # the solver rejects it in the first block, after the writer started
    with pytest.raises(ConfigError, match="blocksize must be an integer >= 1"):
        run_prune(job, progress=False)
    assert not (tmp_path / "z").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".z")]  # no staging folder left behind


def test_a_lazy_run_failing_after_its_passes_leaves_no_folder(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block is written when the failure comes (here: the report summary), so only a
    cleanup around the whole run, not just around the passes, removes the shards."""

    def fail(self: LazyStageIO) -> dict[str, object]:
        raise OSError(28, "No space left on device")

    aborted: list[bool] = []
    abort = LazyStageIO.abort

    def spy(self: LazyStageIO) -> None:
        aborted.append(True)
        abort(self)

    monkeypatch.setattr(LazyStageIO, "summary", fail)
    monkeypatch.setattr(LazyStageIO, "abort", spy)
    with pytest.raises(OSError, match="No space left"):
        run_prune(_job(folder, tmp_path / "w", True), progress=False)
    assert aborted == [True]  # removed at once, not left to garbage collection
    assert not (tmp_path / "w").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w")]


def test_cli_lazy_and_recipe_key(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert main(["prune", "--model", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--lazy", "--out", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lazy"]["shards"] == 3 and report["achieved_sparsity"] == pytest.approx(0.5)
    from graphprune.recipes.recipe import Recipe

    recipe = Recipe.from_dict({"model": str(folder), "prune": {"method": "wanda", "sparsity": 0.5}, "output": {"dir": str(out), "lazy": True}}, "<test>")
    assert recipe.to_job().lazy is True


def test_lazy_reads_are_copies_not_views_of_the_mapped_file(tmp_path: Path) -> None:
    """A tensor read for a stage is the process's own memory: rewriting the file afterwards does
    not change it (a view of the memory-mapped file would keep its pages resident, and counted
    in RSS, for the rest of the run)."""
    from safetensors.torch import save_file

    from graphprune.models.lazy import SafetensorsSource

    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "model.safetensors"
    original = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    save_file({"w": original}, str(path))
    source = SafetensorsSource(tmp_path)
    got = source.get("w")
    save_file({"w": torch.zeros(64, 64)}, str(path))  # same layout, other values, written over the file
    assert torch.equal(got, original)
    got.add_(1)  # and it is writable
    assert torch.equal(source.get("w"), torch.zeros(64, 64))
