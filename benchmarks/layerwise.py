"""Layer-wise reconstruction error of every solver on real Linears of the default model.

For a few Linears of SmolLM2-135M, the statistics of their inputs (``XᵀX`` over the
protocol's 64x512 calibration set, run through the *dense* model) and, for GBLM, the
squared language-modelling gradients of their weights are collected once. Every solver
then prunes each Linear at 50, 60, 70 and 80 % unstructured and 2:4, and the table
reports the relative layer-wise error ``‖WX − ŴX‖² / ‖WX‖²`` (the quantity SparseGPT,
ALPS and proximal minimise) and the solve seconds. Every solver sees exactly the same
statistics, so the columns compare the solvers alone, without the error propagation of
stage-wise calibration.

    python benchmarks/layerwise.py                          # the default layers and patterns
    python benchmarks/layerwise.py --blocks 3 --methods sparsegpt alps
    python benchmarks/layerwise.py --methods proximal --patterns 2:4 --merge   # redo one solver's rows

Writes benchmarks/results/layerwise.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphprune.data import TokenSplits  # noqa: E402
from graphprune.graph.model import GraphModel  # noqa: E402
from graphprune.kernels.packed import load_native  # noqa: E402
from graphprune.models import load_model  # noqa: E402
from graphprune.passes.gradients import GradientStatsPass  # noqa: E402
from graphprune.passes.infra import PassContext  # noqa: E402
from graphprune.passes.observe import InsertObserversPass, RemoveObserversPass, observer_for, select_linears  # noqa: E402
from graphprune.solvers import METHODS, SparsitySpec, get_solver, reconstruction_error  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PATTERNS = {"50%": (0.5, "unstructured"), "60%": (0.6, "unstructured"), "70%": (0.7, "unstructured"),
            "80%": (0.8, "unstructured"), "2:4": (None, "2:4")}
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def collect(gm: GraphModel, names: list[str], calib: torch.Tensor, batch: int, grads: bool) -> dict[str, Any]:
    """Input statistics of ``names`` over the dense model (and gradient statistics if asked)."""
    ctx = PassContext(progress=True, calibration=calib)
    patterns = [n for n in names]
    if grads:
        GradientStatsPass(include=patterns).run(gm, ctx)
    InsertObserversPass(hessian=True, include=patterns).run(gm, ctx)
    observers = {n: observer_for(gm, n) for n in names}
    for obs in observers.values():
        obs.enabled = True
    with torch.no_grad():
        for ids in calib.split(batch):
            gm.gm(ids)
    stats = {n: obs.stats() for n, obs in observers.items()}
    RemoveObserversPass().run(gm, ctx)
    if grads:
        for n in names:
            stats[n].grad_sq = gm.state.grad_sq[n]
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[5, 20], help="decoder blocks whose Linears are pruned")
    ap.add_argument("--linears", nargs="+", default=list(LINEARS), help="Linear suffixes within a block")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m", help="a smaller model (tiny-llama) for a quick smoke run")
    ap.add_argument("--calib", type=int, nargs=2, default=[64, 512], metavar=("N", "LEN"), help="calibration sequences x length")
    ap.add_argument("--results", default=str(RESULTS), help="where layerwise.md/.json go")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an earlier layerwise.json that this run does not recompute")
    args = ap.parse_args()
    for p in args.patterns:
        if p not in PATTERNS:
            ap.error(f"unknown pattern {p!r}; choose from {', '.join(PATTERNS)}")
    torch.manual_seed(0)
    if any(get_solver(m).native_ops for m in args.methods):
        load_native()  # as the prune pass does: the native operators when they build
    loaded = load_model(args.model)
    splits = TokenSplits.from_text(loaded.tokenizer)
    calib = splits.calibration(args.calib[0], args.calib[1], seed=0)
    gm = GraphModel.capture(loaded.model, name=args.model)
    names = [f"model.layers.{b}.{s}" for b in args.blocks for s in args.linears]
    t0 = time.perf_counter()
    stats = collect(gm, names, calib, args.batch_size, grads="gblm" in args.methods)
    log(f"statistics of {len(names)} Linears over {calib.numel()} tokens in {time.perf_counter() - t0:.0f}s")
    targets = {li.name: li.weight for li in select_linears(gm, names)}
    rows: list[dict[str, Any]] = []
    for name in names:
        weight = gm.get_attr(targets[name]).detach().clone()
        st = stats[name]
        for pat in args.patterns:
            spec = SparsitySpec.parse(*PATTERNS[pat])
            for method in args.methods:
                solver = get_solver(method)
                if method == "proximal" and pat != "2:4":
                    continue  # the proximal regulariser induces 2:4 only
                t1 = time.perf_counter()
                res = solver.fn(weight, st, spec, name=name)
                seconds = time.perf_counter() - t1
                _, rel = reconstruction_error(weight, res.weight, st.xtx)
                achieved = float((res.weight == 0).float().mean())
                rows.append({"linear": name, "shape": list(weight.shape), "pattern": pat, "method": method,
                             "rel_error": rel, "sparsity": achieved, "seconds": round(seconds, 3)})
                log(f"{name} {pat} {method}: rel error {rel:.5f}, sparsity {achieved:.4f}, {seconds:.1f}s")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, float32 weights",
            "model": args.model, "calibration": list(args.calib), "statistics": "dense model (not stage-wise)",
            "threads": torch.get_num_threads()}
    methods, patterns = list(args.methods), list(args.patterns)
    earlier = results / "layerwise.json"
    if args.merge and earlier.exists():
        fresh = {(r["linear"], r["pattern"], r["method"]) for r in rows}
        kept = [r for r in json.loads(earlier.read_text())["rows"] if (r["linear"], r["pattern"], r["method"]) not in fresh]
        rows = kept + rows
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        patterns = [p for p in PATTERNS if any(r["pattern"] == p for r in rows)]
    (results / "layerwise.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (results / "layerwise.md").write_text(markdown(rows, meta, methods, patterns))
    print(markdown(rows, meta, methods, patterns))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], methods: list[str], patterns: list[str]) -> str:
    def cell(linear: str, pat: str, method: str, key: str, fmt: str) -> str:
        hit = [r for r in rows if r["linear"] == linear and r["pattern"] == pat and r["method"] == method]
        return format(hit[0][key], fmt) if hit else "-"

    linears = list(dict.fromkeys(r["linear"] for r in rows))
    lines = [
        f"# Layer-wise reconstruction error per solver on {meta['model']}",
        "",
        "Generated by `python benchmarks/layerwise.py`. Relative error ‖WX − ŴX‖² / ‖WX‖² of each solver on real "
        "Linears, with input statistics (and, for GBLM, squared LM-loss gradients) from a "
        f"{meta['calibration'][0]}x{meta['calibration'][1]} calibration set (docs/PROTOCOL.md) through the dense model; every solver sees the same statistics. Machine: {meta['machine']}, "
        f"{meta['threads']} threads. Proximal applies to 2:4 only. Default solver settings (ALPS: default, not fast).",
        "",
    ]
    for pat in patterns:
        lines += [f"## {pat}", "", "| Linear | shape | " + " | ".join(methods) + " |", "|---|---|" + "---:|" * len(methods)]
        for lin in linears:
            shape = next(r["shape"] for r in rows if r["linear"] == lin)
            lines.append(f"| {lin.removeprefix('model.layers.')} | {shape[0]}x{shape[1]} | "
                         + " | ".join(cell(lin, pat, m, "rel_error", ".5f") for m in methods) + " |")
        means = []
        for m in methods:
            vals = [r["rel_error"] for r in rows if r["pattern"] == pat and r["method"] == m]
            means.append(f"{sum(vals) / len(vals):.5f}" if vals else "-")
        lines.append("| **mean** | | " + " | ".join(means) + " |")
        secs = []
        for m in methods:
            vals = [r["seconds"] for r in rows if r["pattern"] == pat and r["method"] == m]
            secs.append(f"{sum(vals):.1f}" if vals else "-")
        lines += ["| solve s (sum) | | " + " | ".join(secs) + " |", ""]
    # head-to-head counts over the (Linear, pattern) pairs both solvers were measured on
    error = {(r["linear"], r["pattern"], r["method"]): r["rel_error"] for r in rows}

    def lower(a: str, b: str, pats: list[str]) -> tuple[int, int]:
        pairs = [(error[lin, p, a], error[lin, p, b]) for p in pats for lin in linears
                 if (lin, p, a) in error and (lin, p, b) in error]
        return sum(x < y for x, y in pairs), len(pairs)

    if "alps" in methods and "sparsegpt" in methods:
        wins, total = lower("alps", "sparsegpt", patterns)
        lines += [f"ALPS has a lower error than SparseGPT on {wins} of {total} (Linear, pattern) pairs.", ""]
    if "proximal" in methods and "sparsegpt" in methods and "2:4" in patterns:
        wins, total = lower("proximal", "sparsegpt", ["2:4"])
        lines += [f"Proximal has a lower 2:4 error than SparseGPT on {wins} of {total} Linears.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
