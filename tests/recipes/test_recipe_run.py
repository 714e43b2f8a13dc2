"""Running recipes end to end on the tiny model: every step's output, progress bars, quiet and
verbose modes, and a run killed with SIGKILL resumed to weights bit-identical to an
uninterrupted run."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from graphprune.cli import main
from graphprune.models.tiny import random_tokens

REPO = Path(__file__).resolve().parents[2]
SMOKE = "recipes/tiny-smoke.yaml"
PRUNE_ONLY = ["--set", "eval=null", "--set", "export=null", "--set", "bench=null"]


def weights_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, str]:
    """``graphprune run recipes/tiny-smoke.yaml`` once (progress bars on); its folder and stderr."""
    out = tmp_path_factory.mktemp("smoke") / "tiny-smoke"
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)  # the recipe's text path is relative to the repository root
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert main(["run", SMOKE, "--out", str(out)]) == 0
    finally:
        os.chdir(cwd)
    return out, err.getvalue()


def test_smoke_recipe_writes_every_step(smoke) -> None:
    out, stderr = smoke
    assert {"model.safetensors", "config.json", "report.json", "model.pt", "bench.json", "bench.md"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(".") or p.suffix == ".ckpt" for p in out.parent.iterdir() if p != out)  # no temporaries, no checkpoint
    report = json.loads((out / "report.json").read_text())
    assert report["ppl"] > 1 and report["steps"]["export"]["torchscript"]["path"] == "model.pt"
    assert report["steps"]["bench"]["records"] == 2  # {dense, pruned} x eager x 1 case
    for bar in ("prune sparsegpt", "perplexity", "export", "latency"):
        assert bar in stderr, f"no {bar!r} progress bar"

    model = AutoModelForCausalLM.from_pretrained(out)
    layers = model.model.layers
    w = layers[0].self_attn.q_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all()  # 2:4 exactly
    assert (layers[0].self_attn.k_proj.weight != 0).all()  # '*.k_proj': skip
    down = layers[1].mlp.down_proj.weight
    assert abs(float((down == 0).float().mean()) - 0.25) < 0.01  # override: 0.25 unstructured

    # export parity: the TorchScript file computes what the saved folder computes
    ids = random_tokens(2, 12, seed=5)
    scripted = torch.jit.load(str(out / "model.pt"))
    with torch.no_grad():
        assert (scripted(ids) - model(input_ids=ids).logits).abs().max() < 1e-4


# ``graphprune prune`` with the same settings as recipes/tiny-smoke.yaml (its prune part)
SMOKE_AS_CLI = ["prune", "--model", "tiny-llama", "--method", "sparsegpt", "--pattern", "2:4", "--text", "recipes/tiny-smoke.txt",
                "--override", "*.layers.1.mlp.down_proj=0.25", "--override", "*.k_proj=skip", "--option", "blocksize=32",
                "--calib-samples", "8", "--calib-len", "64", "--batch-size", "4", "--seed", "0"]


def test_killed_run_resumes_bit_identical_to_an_uninterrupted_run(smoke, tmp_path, monkeypatch, capsys, caplog) -> None:
    """Run 1: the smoke recipe, uninterrupted. Run 2: the same job killed with SIGKILL after its
    first block, then resumed with ``graphprune prune --resume``. Same seed and inputs: the saved
    weights are bit-identical (which also shows the recipe and the CLI build the same job)."""
    out = tmp_path / "killed"
    ckpt = tmp_path / "killed.ckpt"
    script = (
        "import os, signal, sys, torch\n"
        "torch.set_num_threads(int(sys.argv[2]))\n"
        "from graphprune.pipeline.steps import run_pipeline\n"
        "from graphprune.recipes.recipe import Recipe\n"
        "r = Recipe.load('recipes/tiny-smoke.yaml', {'output.dir': sys.argv[1], 'eval': None, 'export': None, 'bench': None})\n"
        "run_pipeline(r.to_pipeline(), progress=False, on_stage=lambda block, total, info: os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(torch.get_num_threads())], cwd=REPO, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not out.exists()
    assert [p.name for p in ckpt.glob("*/block-*.json")] == ["block-0000.json"]  # the first stage survived the kill

    monkeypatch.chdir(REPO)
    assert main(["run", SMOKE, "--out", str(out), *PRUNE_ONLY, "-q"]) == 2  # an interrupted run is not thrown away silently
    assert "pass --resume to continue it" in capsys.readouterr().err

    caplog.set_level(logging.INFO, logger="graphprune")
    assert main([*SMOKE_AS_CLI, "--out", str(out), "--resume", "-q", "-v"]) == 0
    assert "prune sparsegpt" not in capsys.readouterr().err  # -q: no progress bars
    assert "block 0: restored" in caplog.text and "block 1: " in caplog.text  # -v: details
    assert weights_sha256(out) == weights_sha256(smoke[0])
    report = json.loads((out / "report.json").read_text())
    assert [s.get("resumed", False) for s in report["stages"]] == [True, False]
    assert len(report["layers"]) == 12 and not ckpt.exists()
