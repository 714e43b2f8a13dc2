"""Perplexity, achieved sparsity and prune seconds of each method on the default model.

The model is loaded and captured once; every configuration prunes a fresh clone of the
captured graph (weights included) through the same pass pipeline as ``graphprune prune``,
then evaluates it. Protocol: PROTOCOL.md (64x512 calibration, seed 0, perplexity over the
512-token windows of the evaluation split). Results accumulate in
``results/prune_quality.json`` (a rerun of a subset updates those rows) and the table in
``results/prune_quality.md``.

    python benchmarks/prune_quality.py                                  # every configuration
    python benchmarks/prune_quality.py --only "sparsegpt 50%" "wanda 50%"
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from graphprune.data import TokenSplits
from graphprune.eval import perplexity
from graphprune.graph.model import GraphModel
from graphprune.models import load_model
from graphprune.passes.gradients import GradientStatsPass
from graphprune.passes.infra import PassContext, PassManager
from graphprune.passes.observe import InsertObserversPass, RemoveObserversPass
from graphprune.passes.prune import CALIBRATION, PruneConfig, SequentialPrunePass
from graphprune.solvers import SparsitySpec, get_solver

RESULTS = Path(__file__).resolve().parent / "results"
PATTERNS = {"50%": (0.5, "unstructured"), "2:4": (None, "2:4"), "70%": (0.7, "unstructured"),
            "60%": (0.6, "unstructured"), "80%": (0.8, "unstructured")}
DEFAULT_ORDER = [f"{m} {p}" for p in ("50%", "2:4", "70%") for m in ("sparsegpt", "wanda", "magnitude")]


def run_config(base: GraphModel, splits: TokenSplits, calib: torch.Tensor, name: str, options: dict) -> dict:
    method, pat = name.split(" ", 1)
    sparsity, pattern = PATTERNS[pat]
    gm = base.clone()
    spec = SparsitySpec.parse(sparsity, pattern)
    solver = get_solver(method)
    ctx = PassContext(progress=True, data={CALIBRATION: calib})
    passes = [*([GradientStatsPass()] if solver.needs_grad else []), InsertObserversPass(),
              SequentialPrunePass(PruneConfig(method, spec, options=dict(options))), RemoveObserversPass()]
    t0 = time.perf_counter()
    gm = PassManager(passes, ctx).run(gm)
    seconds = time.perf_counter() - t0
    rep = gm.meta["prune_report"]
    ppl = perplexity(gm, splits.eval_windows(512), batch_size=4, progress=True)["ppl"]
    return {"ppl": ppl, "achieved_sparsity": rep["achieved_sparsity"], "prune_seconds": round(seconds, 1),
            "mean_rel_error": sum(e["rel_error"] for e in rep["layers"]) / len(rep["layers"])}


def write_table(rows: dict, dense: dict | None) -> str:
    lines = ["| configuration | perplexity | achieved sparsity | prune s | mean layer rel. error |", "|---|---:|---:|---:|---:|"]
    if dense:
        lines.append(f"| dense | {dense['ppl']:.3f} | 0 | - | - |")
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ppl']:.3f} | {r['achieved_sparsity']:.4f} | {r['prune_seconds']:.1f} | {r['mean_rel_error']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help='configurations such as "sparsegpt 50%%"')
    ap.add_argument("--note", default="", help="load conditions etc., written above the table")
    args = ap.parse_args()
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "prune_quality.json"
    rows = json.loads(out_json.read_text()) if out_json.exists() else {}
    loaded = load_model("smollm2-135m")
    splits = TokenSplits.from_text(loaded.tokenizer)
    calib = splits.calibration(64, 512, seed=0)
    base = GraphModel.capture(loaded.model, name="smollm2-135m")
    for name in args.only or DEFAULT_ORDER:
        print(f"== {name}", flush=True)
        rows[name] = run_config(base, splits, calib, name, {})
        print(f"   {rows[name]}", flush=True)
        out_json.write_text(json.dumps(rows, indent=2) + "\n")
    dense_path = RESULTS / "dense.json"
    dense = json.loads(dense_path.read_text()) if dense_path.exists() else None
    machine = f"{os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__} eager float32"
    table = write_table(rows, dense)
    (RESULTS / "prune_quality.md").write_text(f"Machine: {machine}. {args.note}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
