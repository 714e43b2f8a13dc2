"""Perplexity, achieved sparsity, prune seconds and peak RSS of each method on the default model.

Every configuration runs in its own process (``graphprune prune ... --eval --json``), so the
peak RSS is that configuration's own. Protocol: PROTOCOL.md (64x512 calibration, seed 0,
perplexity over 512-token windows of the evaluation split).

    python benchmarks/prune_quality.py                       # all configurations
    python benchmarks/prune_quality.py --only sparsegpt      # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

CONFIGS = [
    # (method, args)
    (m, a)
    for a in (["--sparsity", "0.5"], ["--pattern", "2:4"], ["--sparsity", "0.7"])
    for m in ("magnitude", "wanda", "sparsegpt")
]


def label(method: str, args: list[str]) -> str:
    return f"{method} {args[1] if args[0] == '--pattern' else str(int(float(args[1]) * 100)) + '%'}"


def run(method: str, args: list[str], extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "graphprune", "prune", "--method", method, *args, "--eval", "--json", "-q",
               "--out", os.path.join(tmp, "out"), *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        rep = json.loads(proc.stdout)
        rep["wall_seconds"] = time.perf_counter() - t0
        return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="methods to run")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for graphprune prune")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "prune_quality.json"
    rows = json.loads(out_json.read_text()) if out_json.exists() else {}
    for method, cargs in CONFIGS:
        if args.only and method not in args.only:
            continue
        name = label(method, cargs)
        print(f"running {name} ...", flush=True)
        rep = run(method, cargs, args.extra)
        rows[name] = {
            "ppl": rep["ppl"],
            "achieved_sparsity": rep["achieved_sparsity"],
            "prune_seconds": rep["prune_seconds"],
            "total_seconds": rep["total_seconds"],
            "peak_rss_mb": rep["peak_rss_mb"],
        }
        print(f"  {rows[name]}", flush=True)
        out_json.write_text(json.dumps(rows, indent=2) + "\n")
    machine = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch eager float32"
    lines = [
        "| configuration | perplexity | achieved sparsity | prune s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    dense = json.loads((RESULTS / "dense.json").read_text()) if (RESULTS / "dense.json").exists() else None
    if dense:
        lines.append(f"| dense | {dense['ppl']:.3f} | 0 | - | - |")
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ppl']:.3f} | {r['achieved_sparsity']:.4f} | {r['prune_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    (RESULTS / "prune_quality.md").write_text(f"Machine: {machine}.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
