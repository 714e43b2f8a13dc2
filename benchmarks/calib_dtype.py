"""bfloat16 against float32 calibration forwards (``graphprune prune --calib-dtype``), in one
interleaved run, whole processes.

For every configuration the two dtypes run back to back (who goes first alternates), each as a
separate ``graphprune prune ... --eval --json`` process on the built-in default model, so wall
time and peak RSS are those a user sees. Recorded per run: wall seconds, peak RSS (``wait4``),
the report's pipeline seconds and its calibration profile (forward, statistics, solve and
propagation seconds and the achieved forward rate), and the perplexity on both protocol texts.
The run starts by measuring the machine's peak matmul rate in float32 and in bfloat16 (a
2048 x 2048 product on all torch threads), so the forward rates can be read against it.

    python benchmarks/calib_dtype.py                      # the default configurations
    python benchmarks/calib_dtype.py --configs sparsegpt=0.5 wanda=2:4 --reps 2
    python benchmarks/calib_dtype.py --render             # rewrite the .md from the JSON

Results: ``benchmarks/results/calib_dtype.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = ("float32", "bfloat16")
DEFAULT_CONFIGS = ("sparsegpt=0.5", "wanda=0.5", "alps=0.5", "magnitude=0.5")


def parse_config(text: str) -> tuple[str, str]:
    method, sep, target = text.partition("=")
    if not sep or not method or not target:
        raise SystemExit(f"--configs takes METHOD=SPARSITY or METHOD=N:M entries, e.g. sparsegpt=0.5 or wanda=2:4; got {text!r}.")
    return method, target


def label(method: str, target: str) -> str:
    return f"{method} {target}" if ":" in target else f"{method} {float(target) * 100:g} %"


def peak_rates(size: int = 2048, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of a ``size``-square matmul on all torch threads, float32 and bfloat16 (best of ``reps``)."""
    import torch

    out: dict[str, float] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(size, size).to(dtype)
        a @ a  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        out[name] = round(2 * size**3 / best / 1e9, 1)
    return out


def drive(args: argparse.Namespace) -> None:
    import torch
    from provenance import Run, last_json, load_average, measured_process  # benchmarks/provenance.py (this script's folder is on sys.path)

    sys.path.insert(0, str(ROOT))
    from graphprune.passes.prune import native_bf16_cpu

    configs = [parse_config(c) for c in args.configs]
    run = Run()
    rates = peak_rates()
    print(f"peak matmul rate: {rates} GFLOP/s; native bfloat16: {native_bf16_cpu()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gp-calib-dtype-"))
    rows: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for index, (method, target) in enumerate(configs):
            order = DTYPES if (rep + index) % 2 == 0 else DTYPES[::-1]
            for dtype in order:
                out = work / f"{method}-{target.replace(':', '_')}-{dtype}-{rep}"
                pattern = ["--pattern", target] if ":" in target else ["--sparsity", target]
                cmd = [sys.executable, "-m", "graphprune", "prune", "--model", args.model, "--method", method, *pattern,
                       "--calib-dtype", dtype, "--eval", "--json", "-q", "--out", str(out)]
                load = load_average()
                print(f"rep {rep} {label(method, target)} {dtype} ...", flush=True)
                wall, rss, stdout = measured_process(cmd, work / f"{out.name}.log")
                res = last_json(stdout)
                prof = res.get("calibration_profile", {})
                row = {
                    "method": method, "target": target, "dtype": dtype, "rep": rep,
                    "wall_seconds": round(wall, 1), "peak_rss_mb": round(rss),
                    "prune_seconds": res["prune_seconds"],
                    "ppl": {name: r["ppl"] for name, r in res["eval"].items()},
                    "achieved_sparsity": res["achieved_sparsity"],
                    "profile": {k: prof.get(k) for k in ("forward_seconds", "statistics_seconds", "solve_seconds", "propagation_seconds", "forward_gflops", "statistics_gflops")},
                    "load_before": load,
                    "cli": " ".join(["graphprune", *cmd[3:-3]]),
                }
                print(f"    {wall:.1f} s, pipeline {row['prune_seconds']:.1f} s, peak RSS {rss:.0f} MiB, perplexity {row['ppl']}", flush=True)
                rows.append(row)
    summary: dict[str, Any] = {}
    for method, target in configs:
        per = {d: [r for r in rows if r["dtype"] == d and r["method"] == method and r["target"] == target] for d in DTYPES}
        med = {
            d: {
                "wall_seconds": statistics.median(r["wall_seconds"] for r in per[d]),
                "prune_seconds": statistics.median(r["prune_seconds"] for r in per[d]),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in per[d]),
                "forward_gflops": statistics.median(r["profile"]["forward_gflops"] or 0 for r in per[d]),
                "ppl": {t: statistics.median(r["ppl"][t] for r in per[d]) for t in per[d][0]["ppl"]},
            }
            for d in DTYPES
        }
        f32, b16 = med["float32"], med["bfloat16"]
        summary[label(method, target)] = {
            **med,
            "wall_speedup": round(f32["wall_seconds"] / b16["wall_seconds"], 3),
            "pipeline_speedup": round(f32["prune_seconds"] / b16["prune_seconds"], 3),
            "ppl_rel_change": {t: round((b16["ppl"][t] - f32["ppl"][t]) / f32["ppl"][t], 5) for t in f32["ppl"]},
        }
    data = run.stamp({"runs": rows, "summary": summary, "reps": args.reps, "peak_gflops": rates,
                      "native_bf16": native_bf16_cpu(), "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calib_dtype.json").write_text(json.dumps(data, indent=2) + "\n")
    render()


def render() -> None:
    data = json.loads((RESULTS / "calib_dtype.json").read_text())
    prov = data["provenance"]
    rates = data["peak_gflops"]
    lines = [
        "# bfloat16 calibration forwards against float32 (`--calib-dtype`)",
        "",
        f"Generated by `{prov['command']}` at commit `{prov['commit']}` ({prov['date']}); load average (1, 5, 15 min) "
        f"{prov['load_average']['start']} at the start, {prov['load_average']['end']} at the end. Machine: {prov.get('torch_threads', '?')} torch threads, "
        f"CPU capability {data['cpu_capability']}, native bfloat16 arithmetic: {'yes' if data['native_bf16'] else 'no'}; "
        f"peak matmul rate measured in the same run: {rates['float32']} GFLOP/s float32, {rates['bfloat16']} GFLOP/s bfloat16. "
        f"Default model, protocol calibration (64 x 512, seed 0) and evaluation (docs/PROTOCOL.md); {data['reps']} repetition(s) per "
        "dtype, the two dtypes of a configuration back to back, who goes first alternating. Whole process: wall time and peak RSS of "
        "`graphprune prune ... --eval` (load, calibration and pruning, evaluation of both texts); pipeline: the report's "
        "`prune_seconds` (the passes: calibration forwards, statistics, solvers). Forward rate: the multiply-adds of the "
        "calibration and propagation forwards (Linears and attention, counted analytically) over their seconds.",
        "",
        "| configuration | dtype | wall s | pipeline s | forward GFLOP/s | peak RSS MiB | perplexity pydoc | perplexity news |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in data["summary"].items():
        for d in DTYPES:
            m = s[d]
            lines.append(
                f"| {key} | {d} | {m['wall_seconds']:.1f} | {m['prune_seconds']:.1f} | {m['forward_gflops']:.1f} | {m['peak_rss_mb']:.0f} | "
                f"{m['ppl']['pydoc']:.3f} | {m['ppl'].get('news', float('nan')):.3f} |"
            )
    lines += ["", "| configuration | bfloat16 speed-up, whole process | bfloat16 speed-up, pipeline | perplexity change pydoc | perplexity change news |", "|---|---:|---:|---:|---:|"]
    for key, s in data["summary"].items():
        ch = s["ppl_rel_change"]
        lines.append(f"| {key} | {s['wall_speedup']:.2f}x | {s['pipeline_speedup']:.2f}x | {ch['pydoc'] * 100:+.2f} % | {ch.get('news', float('nan')) * 100:+.2f} % |")
    lines += ["", "Commands:", ""]
    for r in data["runs"]:
        if r["rep"] == 0:
            lines.append(f"* `{r['cli']}`")
    (RESULTS / "calib_dtype.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "calib_dtype.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="METHOD=TARGET")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--render", action="store_true", help="only rewrite calib_dtype.md from the JSON")
    args = p.parse_args()
    if args.render:
        render()
    else:
        drive(args)


if __name__ == "__main__":
    main()
