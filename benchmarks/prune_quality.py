"""Perplexity, achieved sparsity and prune seconds of each method on the default model.

Each configuration runs exactly what ``graphprune prune --model smollm2-135m --method M
[--sparsity S | --pattern N:M] --eval`` runs (:func:`graphprune.pipeline.run_prune` with
checkpointing off), so the command line and this script give the same figure for the same
settings; each row records that command. Protocol: docs/PROTOCOL.md (64x512 calibration,
seed 0, perplexity over the 512-token windows of the evaluation split). Results accumulate in
``results/prune_quality.json`` (a rerun of a subset updates those rows, each stamped with its
commit, date, load average and command) and the table in ``results/prune_quality.md``; the
README's table is generated from the JSON by ``python scripts/readme_tables.py``.

    python benchmarks/prune_quality.py                                  # every configuration
    python benchmarks/prune_quality.py --only dense "sparsegpt 50%" "wanda 50%"
    python benchmarks/prune_quality.py --only "gblm 2:4 samples=64"     # with a solver option
    python benchmarks/prune_quality.py --only "sparsegpt 50% calib=pydoc+news"  # calibrated on both texts, equal shares
    python benchmarks/prune_quality.py --only "sparsegpt 50% calib_samples=16"  # 16 calibration segments
    python benchmarks/prune_quality.py --only "sparsegpt 50% calib_samples=16 eval_windows=8"  # the suite's check: first 8 windows per text
    python benchmarks/prune_quality.py --render                         # rewrite the .md from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from provenance import Run

from graphprune.pipeline import EvalJob, PruneJob, run_eval, run_prune

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
PATTERNS = {"50%": (0.5, "unstructured"), "2:4": (None, "2:4"), "70%": (0.7, "unstructured"),
            "60%": (0.6, "unstructured"), "80%": (0.8, "unstructured")}
METHOD_ORDER = ("alps", "proximal", "sparsegpt", "gblm", "wanda", "magnitude")
PATTERN_ORDER = ("50%", "60%", "70%", "80%", "2:4")
DEFAULT_ORDER = [f"{m} {p}" for p in PATTERN_ORDER for m in METHOD_ORDER if m != "proximal" or p == "2:4"]
NOTES = RESULTS / "prune_quality.notes.md"  # hand-written notes on how rows were measured, kept below the tables


def job_for(name: str) -> PruneJob:
    """``"gblm 2:4 samples=64"`` -> the PruneJob of ``graphprune prune`` with those settings
    (``calib=pydoc+news``: calibrate on those texts, equal shares, and evaluate on both;
    ``calib_samples=16``: that many calibration segments; ``eval_windows=8``: score only the
    first 8 windows of each text, a quick check that is not a protocol figure)."""
    method, pat, *extra = name.split(" ")
    if method.startswith("structured-"):  # "structured-obs 30%": remove 30 % of the block parameters as whole structures
        return PruneJob(model=MODEL, structured=float(pat.rstrip("%")) / 100, structured_method=method.split("-", 1)[1], evaluate=True,
                        checkpoint=False)
    sparsity, pattern = PATTERNS[pat]
    options: dict[str, Any] = {}
    texts: tuple[str, ...] = ()
    samples = 64
    windows = None
    for item in extra:  # solver options, and the job's calibration settings
        key, _, value = item.partition("=")
        if key == "calib":
            texts = tuple(value.split("+"))
        elif key == "calib_samples":
            samples = int(value)
        elif key == "eval_windows":
            windows = int(value)
        else:
            options[key] = json.loads(value)
    return PruneJob(model=MODEL, method=method, sparsity=sparsity, pattern=pattern, options=options, evaluate=True, checkpoint=False,
                    text=texts, eval_text=("pydoc", "news") if texts else (), calib_samples=samples, eval_windows=windows)


def cli_for(job: PruneJob) -> str:
    if job.structured:
        return f"graphprune prune --model {job.model} --structured {job.structured} --structured-method {job.structured_method} --eval"
    target = f"--pattern {job.pattern}" if ":" in job.pattern else f"--sparsity {job.sparsity}"
    options = "".join(f" --option {k}={json.dumps(v)}" for k, v in job.options.items())
    texts = f" --text {' '.join(job.text)} --eval-text {' '.join(job.eval_text)}" if job.text else ""
    samples = f" --calib-samples {job.calib_samples}" if job.calib_samples != 64 else ""
    windows = f" --eval-windows {job.eval_windows}" if job.eval_windows is not None else ""
    return f"graphprune prune --model {job.model} --method {job.method} {target}{options}{texts}{samples} --eval{windows}"


def run_dense(run: Run) -> dict[str, Any]:
    """The unpruned model's perplexity, as ``graphprune eval --model smollm2-135m --json`` gives it."""
    res = run_eval(EvalJob(model=MODEL), progress=True)
    row = {k: res[k] for k in ("model", "ppl", "nll", "tokens", "seconds", "eval_seconds")}
    row["ppl_news"] = res["texts"]["news"]["ppl"]
    return run.stamp(row, cli=f"graphprune eval --model {MODEL} --json")


def run_config(name: str, run: Run) -> dict[str, Any]:
    job = job_for(name)
    rep = run_prune(job, progress=True).report
    layers = rep.get("layers", [])
    row = {"ppl": rep["ppl"], "ppl_news": rep["eval"]["news"]["ppl"], "achieved_sparsity": rep["achieved_sparsity"], "prune_seconds": rep["prune_seconds"],
           # the rankers (magnitude, wanda, gblm) report no layer errors unless asked (--layer-errors)
           "mean_rel_error": (sum(e["rel_error"] for e in layers) / len(layers)) if layers and all("rel_error" in e for e in layers) else None}
    if job.eval_windows is not None:  # first windows only: a quick check, not the protocol figure
        row["eval_windows"] = job.eval_windows
    if job.structured:  # parameters removed, not zeros
        row["parameters_before"], row["parameters_after"] = rep["parameters_before"], rep["parameters_after"]
    if "calibration_profile" in rep:  # seconds and multiply-adds of the stage-wise calibration, and the machine's matmul peak
        from graphprune.bench.latency import peak_matmul_gflops

        row["calibration_profile"] = {**rep["calibration_profile"], "peak_matmul_gflops": round(peak_matmul_gflops(), 1)}
    # no peak RSS here: it is the whole process's, which ran earlier configurations too
    return run.stamp(row, cli=cli_for(job))


def write_table(rows: dict, dense: dict | None) -> str:
    lines = ["| configuration | perplexity pydoc | perplexity news | achieved sparsity | prune s | mean layer rel. error | commit | date | load (start / end) |",
             "|---|---:|---:|---:|---:|---:|---|---|---|"]
    if dense:
        lines.append(f"| dense | {dense['ppl']:.3f} | {news_cell(dense)} | 0 | - | - | {provenance_cells(dense)} |")
    order = [n for n in DEFAULT_ORDER if n in rows] + [n for n in rows if n not in DEFAULT_ORDER]
    for name in order:
        r = rows[name]
        lines.append(f"| {name} | {r['ppl']:.3f} | {news_cell(r)} | {r['achieved_sparsity']:.4f} | {r['prune_seconds']:.1f} | "
                     f"{'-' if r.get('mean_rel_error') is None else format(r['mean_rel_error'], '.4f')} | {provenance_cells(r)} |")
    return "\n".join(lines)


def news_cell(row: dict[str, Any]) -> str:
    """The second text's perplexity; '-' for rows measured before it was part of the protocol."""
    return f"{row['ppl_news']:.3f}" if "ppl_news" in row else "-"


def provenance_cells(row: dict[str, Any]) -> str:
    p = row.get("provenance") or {}
    load = p.get("load_average") or {}
    fmt = lambda v: "-" if not v else f"{v[0]:.1f}"  # noqa: E731 - 1-minute average
    return f"`{p.get('commit', '?')}` | {p.get('date', '?')} | {fmt(load.get('start'))} / {fmt(load.get('end'))}"


def commands(rows: dict[str, Any]) -> str:
    """Each row's command (the equivalent ``graphprune prune`` call)."""
    out = []
    for name, r in rows.items():
        p = r.get("provenance") or {}
        how = f"`{p['cli']}`" if p.get("cli") else p.get("note", "")
        out.append(f"* {name}: {how} (run by `{p.get('command', '?')}`)")
    return "\n".join(out)


def write_grid(rows: dict) -> str:
    """Perplexity per method (rows) and pattern (columns); '-' where not measured."""
    lines = ["| method | " + " | ".join(PATTERN_ORDER) + " |", "|---|" + "---:|" * len(PATTERN_ORDER)]
    for m in METHOD_ORDER:
        cells = []
        for p in PATTERN_ORDER:
            r = rows.get(f"{m} {p}")
            cells.append(f"{r['ppl']:.3f} / {news_cell(r)}" if r else ("n/a" if m == "proximal" and p != "2:4" else "-"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(rows: dict) -> str:
    dense_path = RESULTS / "dense.json"
    dense = json.loads(dense_path.read_text()) if dense_path.exists() else None
    machine = f"{os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__} eager float32"
    parts = [
        "# Pruning quality on SmolLM2-135M",
        "",
        "Generated by `python benchmarks/prune_quality.py` (rows accumulate in `prune_quality.json`). Protocol: "
        "docs/PROTOCOL.md: 64x512 calibration, seed 0, perplexity over the 512-token windows of the evaluation split, "
        f"float32. Machine: {machine}. Achieved sparsity is counted from the zeros of the final weights of the block "
        "Linears; `prune s` is the pass pipeline (statistics passes, stage-wise calibration, solvers) of one "
        "configuration, model loading and capture excluded; `mean layer rel. error` is the mean over Linears of "
        "‖WX − ŴX‖² / ‖WX‖² on each Linear's stage-wise calibration inputs. Default solver settings. Each row names "
        "the commit it was measured at (`+dirty`: with uncommitted changes to the code), the date and the load average; "
        "the commands are listed below the table. A row named `eval_windows=K` scores only the first K windows of each text "
        "(the test suite reproduces it in a minute and a half): a reproducibility check, not a protocol figure.",
        "",
        (f"Perplexity on the protocol text / on the second text, news prose (dense {dense['ppl']:.3f} / {news_cell(dense)}); "
         "`-` not measured yet (rows measured before the second text joined the protocol have the first figure only), "
         "`n/a` not applicable (the proximal regulariser induces 2:4 only):") if dense else "Perplexity:",
        "",
        write_grid(rows),
        "",
        "All rows:",
        "",
        write_table(rows, dense),
        "",
        "Commands:",
        "",
        commands(rows),
        "",
    ]
    if NOTES.exists():
        parts += [NOTES.read_text().strip(), ""]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help='configurations such as "sparsegpt 50%%", or "dense"')
    ap.add_argument("--render", action="store_true", help="only rewrite prune_quality.md from the JSON")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "prune_quality.json"
    rows = json.loads(out_json.read_text()) if out_json.exists() else {}
    if not args.render:
        run = Run()
        for name in args.only or ["dense", *DEFAULT_ORDER]:
            print(f"== {name}", flush=True)
            if name == "dense":
                dense = run_dense(run)
                (RESULTS / "dense.json").write_text(json.dumps(dense, indent=2) + "\n")
                print(f"   {dense}", flush=True)
                continue
            rows[name] = run_config(name, run)
            print(f"   {rows[name]}", flush=True)
            out_json.write_text(json.dumps(rows, indent=2) + "\n")
            (RESULTS / "prune_quality.md").write_text(render(rows))
    text = render(rows)
    (RESULTS / "prune_quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
