"""Two processes on the gloo backend prune exactly like one process.

The workers are spawned with torch.multiprocessing and join a gloo group through a file;
each runs the same ``run_prune`` as a single process would. Rank 0 saves its weights and
masks, which must equal the single-process run's: masks exactly, weights within float32
tolerance (the Hessians are summed in a different order, in float64).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from graphprune.distributed import Dist, current
from graphprune.pipeline import PruneJob, run_prune

pytestmark = pytest.mark.slow  # heavy: spawns process groups and torchrun

# (method, calibration samples, batch size): 24/8 gives 3 micro-batches, an uneven 2 + 1 split
CASES = [("wanda", 24, 8), ("sparsegpt", 32, 4), ("gblm", 8, 4)]


def _job(method: str, samples: int, batch: int, evaluate: bool = False) -> PruneJob:
    return PruneJob(
        model="tiny-llama", method=method, sparsity=0.5, calib_samples=samples, calib_len=32,
        batch_size=batch, checkpoint=False, evaluate=evaluate, eval_len=32,
    )


def _result(outcome) -> dict[str, torch.Tensor]:
    gm = outcome.gm
    out = {f"mask:{n}": m.to(torch.uint8) for n, m in gm.state.masks.items()}
    for li in gm.block_linears():
        out[f"weight:{li.name}"] = gm.get_attr(li.weight).detach().clone()
    out["ppl"] = torch.tensor([outcome.report.get("ppl", 0.0)], dtype=torch.float64)
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert current() == Dist(rank, world, "gloo")
        for method, samples, batch in CASES:
            outcome = run_prune(_job(method, samples, batch, evaluate=method == "wanda"), progress=False)
            if rank == 0:
                save_file(_result(outcome), os.path.join(out_dir, f"{method}.safetensors"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("method,samples,batch", CASES)
def test_two_processes_match_one(two_process_results: Path, method: str, samples: int, batch: int) -> None:
    assert not current().active
    single = _result(run_prune(_job(method, samples, batch, evaluate=method == "wanda"), progress=False))
    double = load_file(str(two_process_results / f"{method}.safetensors"))
    assert set(single) == set(double)
    masks = [k for k in single if k.startswith("mask:")]
    assert len(masks) == 2 * 7  # every block Linear of tiny-llama
    for key in masks:
        assert torch.equal(single[key], double[key]), f"{method}: {key} differs between 1 and 2 processes"
        assert single[key].float().mean().item() == pytest.approx(0.5)
    for key in (k for k in single if k.startswith("weight:")):
        torch.testing.assert_close(double[key], single[key], rtol=1e-5, atol=1e-6)
    if method == "wanda":  # sharded evaluation windows, reduced NLL
        assert double["ppl"].item() == pytest.approx(single["ppl"].item(), rel=1e-6)


def test_dist_shares_cover_everything() -> None:
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            spans = [Dist(r, world).bounds(n) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            sizes = [hi - lo for lo, hi in spans]
            assert max(sizes) - min(sizes) <= 1


def test_too_few_micro_batches_is_a_clear_error() -> None:
    from graphprune.errors import ConfigError

    with pytest.raises(ConfigError, match="2 processes need at least 2 calibration micro-batches"):
        Dist(1, 2).shard([0], "calibration micro-batches")


def test_torchrun_cli_writes_once_and_matches(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m graphprune prune`` writes one folder equal to a 1-process run."""
    args = ["prune", "--model", "tiny-llama", "--method", "sparsegpt", "--sparsity", "0.5",
            "--calib-samples", "16", "--calib-len", "32", "--batch-size", "4", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "graphprune", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1  # only rank 0 reports
    one = subprocess.run([sys.executable, "-m", "graphprune", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key] == 0, b[key] == 0), key
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob("two*.ckpt"))  # the checkpoint is removed after the write
