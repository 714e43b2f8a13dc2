"""Scale-out on the default model: lazy loading and 2-process (gloo) data parallelism.

1. Lazy vs in-memory: the default model is written once as a float32 safetensors folder
   (``graphprune convert``); Wanda 50 % prunes it with the whole model in memory and with
   ``--lazy`` (one block at a time), each in its own process. Reported: peak RSS of each
   process, the model's size, and whether the two outputs are identical.
2. One vs two processes: ``torchrun --standalone --nproc-per-node 2 -m graphprune prune``
   (gloo) for Wanda and SparseGPT at 50 %, compared with the single-process run of the
   same job: mask agreement and the largest weight difference.

Protocol: docs/PROTOCOL.md (64x512 calibration, seed 0). Every run is a separate process, so
peak RSS is that run's own high-water mark.

    python benchmarks/scale_out.py
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from provenance import commit
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "out" / "scale-out"
PRUNE = ["prune", "--sparsity", "0.5", "-q", "--overwrite", "--json"]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args: list[str], torchrun: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Run graphprune (under torchrun with ``torchrun`` processes); return its JSON report and wall time.

    ``threads`` pins the process's intra-op threads (torchrun gives each rank one thread).
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] if torchrun else [sys.executable]
    cmd = [*launcher, "-m", "graphprune", *args]
    say("$ " + " ".join(cmd[1:]))
    t0 = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}):\n{res.stderr[-4000:]}")
    start = res.stdout.find("{")
    report = json.loads(res.stdout[start:]) if start >= 0 else {}
    return {"wall_seconds": round(wall, 1), "report": report}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    a, b = weights(a_dir), weights(b_dir)
    if set(a) != set(b):
        return {"same_tensors": False}
    pruned = [k for k in a if ".layers." in k and k.endswith("proj.weight")]
    mask_diff = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in pruned)
    numel = sum(a[k].numel() for k in pruned)
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    identical = all(torch.equal(a[k], b[k]) for k in a)
    return {"same_tensors": True, "pruned_weights": numel, "mask_differences": mask_diff, "max_abs_weight_diff": max_diff, "bit_identical": identical}


def main() -> None:
    global WORK, RESULTS, PRUNE
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="tiny-llama for a quick smoke run")
    ap.add_argument("--calib", nargs=2, type=int, default=None, metavar=("N", "L"), help="calibration samples and length (default: protocol)")
    # runs are reused only by the same code: the work folder is keyed by the commit
    ap.add_argument("--work", default=str(ROOT / "out" / "scale-out" / commit().replace("+", "-")))
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--markdown", action="store_true", help="only rewrite the table from the JSON")
    ap.add_argument("--skip-lazy", action="store_true", help="keep the lazy-loading rows already in the JSON")
    args = ap.parse_args()
    WORK, RESULTS = Path(args.work), Path(args.results)
    if args.markdown:
        write_md(json.loads((RESULTS / "scale_out.json").read_text()))
        return
    if args.calib:
        PRUNE = [*PRUNE, "--calib-samples", str(args.calib[0]), "--calib-len", str(args.calib[1])]
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {"machine": f"{os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, CPU, gloo"}
    folder = WORK / f"{args.model}-f32"
    if not (folder / "config.json").is_file():
        run(["convert", "--model", args.model, "--out", str(folder), "-q", "--overwrite"])
    model_bytes = sum(t.numel() * t.element_size() for t in weights(folder).values())
    rows["model_mib"] = round(model_bytes / 2**20, 1)

    # 1. lazy vs in-memory
    lazy: dict[str, Any] = {}
    for mode in () if args.skip_lazy else ("in-memory", "lazy"):
        out = WORK / f"wanda-{mode}"
        r = run([*PRUNE, "--model", str(folder), "--method", "wanda", "--out", str(out), *(["--lazy"] if mode == "lazy" else [])])
        lazy[mode] = {"peak_rss_mib": r["report"].get("peak_rss_mb"), "prune_seconds": r["report"].get("prune_seconds"), "wall_seconds": r["wall_seconds"],
                      "achieved_sparsity": r["report"].get("achieved_sparsity"), "materialised_peak_mib": (r["report"].get("lazy") or {}).get("peak_materialised_mb")}
    if args.skip_lazy:
        lazy = json.loads((RESULTS / "scale_out.json").read_text())["lazy"]
    else:
        lazy["comparison"] = compare(WORK / "wanda-in-memory", WORK / "wanda-lazy")
    rows["lazy"] = lazy
    (RESULTS / "scale_out.json").write_text(json.dumps(rows, indent=2) + "\n")

    # 2. one vs two processes
    dp: dict[str, Any] = {}
    for method in ("wanda", "sparsegpt"):
        # the reference runs with one thread, like each torchrun rank: float32 matmuls round
        # differently with a different thread count, and SparseGPT amplifies such last-bit
        # differences into mask flips over 30 blocks (see the note in the results)
        one_dir, two_dir = WORK / f"{method}-1proc-1thread", WORK / f"{method}-2proc"
        if (one_dir / "report.json").is_file() and json.loads((one_dir / "report.json").read_text()).get("calibration") == ([64, 512] if not args.calib else list(args.calib)):
            report = json.loads((one_dir / "report.json").read_text())
            one = {"wall_seconds": report.get("total_seconds"), "report": report}
            say(f"reusing the single-process run in {one_dir}")
        else:
            one = run([*PRUNE, "--model", args.model, "--method", method, "--out", str(one_dir)], threads=1)
        earlier = WORK / f"{method}-1proc-2threads"  # the same job with the default 2 threads
        if args.model == "smollm2-135m" and not args.calib:
            if not (earlier / "model.safetensors").is_file():
                run([*PRUNE, "--model", args.model, "--method", method, "--out", str(earlier)])
            dp_two_threads = compare(earlier, one_dir)
        else:
            dp_two_threads = None
        if (two_dir / "report.json").is_file() and json.loads((two_dir / "report.json").read_text()).get("processes") == 2 and not args.calib:
            report = json.loads((two_dir / "report.json").read_text())
            two = {"wall_seconds": report.get("total_seconds"), "report": report}
            say(f"reusing the two-process run in {two_dir}")
        else:
            two = run([*PRUNE, "--model", args.model, "--method", method, "--out", str(two_dir)], torchrun=2)
        dp[method] = {
            "one": {"wall_seconds": one["wall_seconds"], "prune_seconds": one["report"].get("prune_seconds"), "peak_rss_mib": one["report"].get("peak_rss_mb")},
            "two": {"wall_seconds": two["wall_seconds"], "prune_seconds": two["report"].get("prune_seconds"), "peak_rss_mib_rank0": two["report"].get("peak_rss_mb"),
                    "processes": two["report"].get("processes")},
            "comparison": compare(one_dir, two_dir),
            "one_process_2_threads_vs_1_thread": dp_two_threads,
        }
        rows["data_parallel"] = dp
        (RESULTS / "scale_out.json").write_text(json.dumps(rows, indent=2) + "\n")
    write_md(rows)


def write_md(rows: dict[str, Any]) -> None:
    lz = rows["lazy"]
    c = lz["comparison"]
    lines = [
        "# Scale-out on SmolLM2-135M",
        "",
        f"Generated by `python benchmarks/scale_out.py`. Machine: {rows['machine']}. Protocol: docs/PROTOCOL.md (64x512 calibration, seed 0).",
        "Each run is its own process; peak RSS is that process's high-water mark (`ru_maxrss`).",
        "",
        f"## Lazy loading (Wanda 50 %, float32 model folder of {rows['model_mib']} MiB)",
        "",
        "| mode | peak RSS MiB | weights materialised at once (MiB) | prune s | wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("in-memory", "lazy"):
        r = lz[mode]
        mat = r["materialised_peak_mib"] if r["materialised_peak_mib"] is not None else rows["model_mib"]
        lines.append(f"| {mode} | {r['peak_rss_mib']:.0f} | {mat} | {r['prune_seconds']} | {r['wall_seconds']} |")
    saved = lz["in-memory"]["peak_rss_mib"] - lz["lazy"]["peak_rss_mib"]
    lines += [
        "",
        f"Outputs bit-identical: **{c.get('bit_identical')}** (mask differences {c.get('mask_differences')}, max |Δw| {c.get('max_abs_weight_diff')}). "
        f"Lazy loading lowers peak RSS by {saved:.0f} MiB; what remains is the process itself (torch, transformers, the captured graph) "
        "and one stage's calibration activations (64x512 tokens), which do not grow with the model's depth.",
        "",
        "## One process vs two (torchrun, gloo), 50 % unstructured",
        "",
        "The reference is one process, normally with one intra-op thread, the thread count each torchrun rank gets (column `ref. threads`).",
        "",
        "| method | ref. threads | mask differences / pruned weights | max abs weight diff | 1 process wall s | 2 processes wall s | 1 process, 2 threads vs 1 thread: mask differences |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in rows.get("data_parallel", {}).items():
        cmp_ = r["comparison"]
        t2 = r.get("one_process_2_threads_vs_1_thread") or {}
        lines.append(
            f"| {method} | {r.get('reference_threads', 1)} | {cmp_['mask_differences']} / {cmp_['pruned_weights']:,} | {cmp_['max_abs_weight_diff']:.2e} | "
            f"{r['one']['wall_seconds']} | {r['two']['wall_seconds']} | {t2.get('mask_differences', '-')} |"
        )
    lines += [
        "",
        "The two processes split the 8 calibration micro-batches 4 + 4, sum the Hessians with all_reduce (float64) and solve the Linears of",
        "each block round-robin, broadcasting the results. On this 2-core machine the two ranks share the same two cores (one thread each),",
        "so wall time is not expected to drop; the point of the run is that the result is the single-process one.",
        "",
        "Float32 matrix products round differently with a different number of threads. SparseGPT's sequential updates and the",
        "stage-wise propagation of pruning error amplify such last-bit differences: once a near-tie flips a mask entry in one block,",
        "the next blocks are calibrated on slightly different activations. The last column shows the size of that effect within a",
        "single process (2 threads vs 1), with no distribution involved.",
    ]
    (RESULTS / "scale_out.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
