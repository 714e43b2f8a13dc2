"""Structured solvers on the same statistics: reconstruction error of every MLP down projection
and every attention output projection.

One calibration pass (docs/PROTOCOL.md: 64 segments of 512 tokens) over the dense default
model collects ``XᵀX``, ``Σx`` and ``Σx²`` of every MLP down projection's and attention output
projection's input. Each
structured solver then removes the same number of input channels from each down projection
(``--keep``, a fraction of the width), on exactly those statistics, and the relative
reconstruction error ``‖W X − V X_K‖² / ‖W X‖²`` of the result is recorded per layer. Rows
removed from the gate and up projections carry no update in any method, so this error is the
whole difference between the methods at a layer. For the output projections the unit is a
query head (``head_dim`` columns) and each KV group keeps ``--keep-heads`` of its query heads
(the rows removed from q carry no update either).

    python benchmarks/structured_layers.py            # about 10 minutes on 2 cores

Writes benchmarks/results/structured_layers.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from latency import say  # noqa: E402
from provenance import Run  # noqa: E402

from graphprune.data import TokenSplits  # noqa: E402
from graphprune.fileio import write_json, write_text  # noqa: E402
from graphprune.graph.model import GraphModel  # noqa: E402
from graphprune.graph.stages import StagedGraph, StageRunner  # noqa: E402
from graphprune.graph.structures import find_channel_groups, find_head_groups  # noqa: E402
from graphprune.models import load_model  # noqa: E402
from graphprune.passes.infra import PassContext, PassManager  # noqa: E402
from graphprune.passes.observe import InsertObserversPass, observer_for, through_observers  # noqa: E402
from graphprune.pipeline.export_bench import load_average  # noqa: E402
from graphprune.solvers.structured import STRUCTURED_METHODS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("wanda-sp", "flap", "obs", "obs-swap")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--keep", type=float, default=0.6, help="fraction of each down projection's input channels kept")
    ap.add_argument("--keep-heads", type=int, default=2, help="query heads each KV group keeps in the output projections")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    run = Run()
    loaded = load_model(args.model)
    splits = TokenSplits.from_text(loaded.tokenizer, None)
    calib = splits.calibration(64, 512, 0)
    gm = GraphModel.capture(loaded.model, name=loaded.name)
    gm = PassManager([InsertObserversPass(hessian=True)], PassContext(progress=False, calibration=calib)).run(gm)
    groups = find_channel_groups(gm, skip=through_observers(gm))
    heads = find_head_groups(gm, skip=through_observers(gm))
    obs = [observer_for(gm, g.consumer.name) for g in [*groups, *heads]]
    for o in obs:
        o.reset()
        o.enabled = True
    say(f"calibration pass over {len(groups)} MLPs and {len(heads)} attentions ...")
    StageRunner(StagedGraph(gm), list(calib.split(8))).run()
    for o in obs:
        o.enabled = False
    rows: list[dict[str, Any]] = []
    for g, o in zip(groups, obs[: len(groups)], strict=True):
        stats = o.stats()
        weight = gm.get_attr(g.consumer.weight).detach()
        keep = int(round(args.keep * g.width))
        row: dict[str, Any] = {"layer": g.consumer.name, "width": g.width, "keep": keep}
        for method in METHODS:
            t0 = time.perf_counter()
            choice = STRUCTURED_METHODS[method](weight, stats, keep, name=g.consumer.name)
            row[method] = {"rel_error": choice.info["rel_error"], "seconds": round(time.perf_counter() - t0, 2)}
        rows.append(row)
        say(f"{g.consumer.name}: " + ", ".join(f"{m} {row[m]['rel_error']:.4f}" for m in METHODS))
    head_rows: list[dict[str, Any]] = []
    for h, o in zip(heads, obs[len(groups) :], strict=True):
        stats = o.stats()
        weight = gm.get_attr(h.consumer.weight).detach()
        units = torch.arange(h.heads * h.head_dim).view(h.heads, h.head_dim)
        parents = torch.arange(h.heads) // h.rep
        keep = args.keep_heads * h.kv_heads
        row = {"layer": h.consumer.name, "heads": h.heads, "kv_heads": h.kv_heads, "keep": keep}
        for method in METHODS:
            t0 = time.perf_counter()
            choice = STRUCTURED_METHODS[method](weight, stats, keep, name=h.consumer.name, units=units, parents=parents)
            row[method] = {"rel_error": choice.info["rel_error"], "seconds": round(time.perf_counter() - t0, 2), "kept_heads": choice.info["kept_units"]}
        head_rows.append(row)
        say(f"{h.consumer.name}: " + ", ".join(f"{m} {row[m]['rel_error']:.4f}" for m in METHODS))
    provenance = run.stamp({})["provenance"]

    def summary(rows: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, float], dict[str, float]]:
        wins = {
            "obs < wanda-sp": sum(r["obs"]["rel_error"] < r["wanda-sp"]["rel_error"] for r in rows),
            "obs < flap": sum(r["obs"]["rel_error"] < r["flap"]["rel_error"] for r in rows),
            "obs-swap < obs": sum(r["obs-swap"]["rel_error"] < r["obs"]["rel_error"] for r in rows),
            "obs-swap <= obs": sum(r["obs-swap"]["rel_error"] <= r["obs"]["rel_error"] for r in rows),
        }
        mean = {m: sum(r[m]["rel_error"] for r in rows) / max(len(rows), 1) for m in METHODS}
        secs = {m: sum(r[m]["seconds"] for r in rows) for m in METHODS}
        return wins, mean, secs

    wins, mean, secs = summary(rows)
    hwins, hmean, hsecs = summary(head_rows)
    lines = [
        f"# Structured solvers on the same statistics: {args.model}'s MLP down projections, {args.keep:.0%} of channels kept",
        "",
        f"Generated by `{provenance['command']}` at commit {provenance['commit']} ({provenance['date']}); load average "
        f"{load_average()} at the end. Relative reconstruction error ‖W X − V X_K‖² / ‖W X‖² per layer on the dense model's "
        "calibration statistics (64 x 512 tokens); lower is better.",
        "",
        f"Layers where: {', '.join(f'{k}: {v} of {len(rows)}' for k, v in wins.items())}.",
        "",
        "| method | mean relative error | solver seconds (all layers) |",
        "|---|---:|---:|",
        *[f"| {m} | {mean[m]:.4f} | {secs[m]:.1f} |" for m in METHODS],
        "",
        "| layer | width | kept | " + " | ".join(METHODS) + " |",
        "|---|---:|---:|" + "---:|" * len(METHODS),
        *[f"| {r['layer']} | {r['width']} | {r['keep']} | " + " | ".join(f"{r[m]['rel_error']:.4f}" for m in METHODS) + " |" for r in rows],
        "",
        f"## Attention output projections, {args.keep_heads} query heads kept per KV group",
        "",
        f"Layers where: {', '.join(f'{k}: {v} of {len(head_rows)}' for k, v in hwins.items())}.",
        "",
        "| method | mean relative error | solver seconds (all layers) |",
        "|---|---:|---:|",
        *[f"| {m} | {hmean[m]:.4f} | {hsecs[m]:.1f} |" for m in METHODS],
        "",
        "| layer | heads (query/KV) | kept | " + " | ".join(METHODS) + " |",
        "|---|---:|---:|" + "---:|" * len(METHODS),
        *[
            f"| {r['layer']} | {r['heads']}/{r['kv_heads']} | {r['keep']} | " + " | ".join(f"{r[m]['rel_error']:.4f}" for m in METHODS) + " |"
            for r in head_rows
        ],
        "",
    ]
    out = Path(args.results)
    heads_part = {"keep_heads": args.keep_heads, "wins": hwins, "mean": hmean, "seconds": hsecs, "rows": head_rows}
    data = {"provenance": provenance, "keep": args.keep, "wins": wins, "mean": mean, "seconds": secs, "rows": rows, "heads": heads_part}
    write_json(out / "structured_layers.json", data)
    write_text(out / "structured_layers.md", "\n".join(lines))
    say(f"wrote {out / 'structured_layers.md'}")


if __name__ == "__main__":
    main()
