"""Rotations and slicing on the default model: perplexity, prune seconds, parameter counts.

Configurations (docs/PROTOCOL.md: 64x512 calibration, seed 0; perplexity over the 512-token
windows of the evaluation split):

* slicing 20 / 25 / 30 % of the PCA-rotated stream (no pruning);
* Wanda 50 % and SparseGPT 50 %, without rotation and with PCA, random-Hadamard and
  learned (RotPruner) rotations.

Each configuration runs exactly what ``graphprune prune --rotate R [--slice F] [--method M
--sparsity 0.5] --eval`` runs (:func:`graphprune.pipeline.run_prune`, the learned rotation
with the command line's defaults for the solver that follows), so this script and the command
line give the same figure; nothing is cached between configurations. ``rotation s`` is the
fold/rotate/slice passes of the configuration, ``prune s`` its whole pass pipeline. With
``--save-sliced DIR`` the 30 % sliced model is written there (a model folder) and reloaded
with ``graphprune.models.load_model`` and compared with the graph.

    python benchmarks/rotations.py                  # every configuration not yet in the results
    python benchmarks/rotations.py --only "wanda 50%" "learned + wanda 50%"
    python benchmarks/rotations.py --force          # recompute everything
    python benchmarks/rotations.py --render         # rewrite rotations.md from the JSON

Writes benchmarks/results/rotations.json after every configuration (each row stamped with
its commit, date, load average and command), and rotations.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from provenance import Run

from graphprune.graph.edit import parameter_count
from graphprune.models import load_model
from graphprune.passes.infra import relative_diff
from graphprune.pipeline import PruneJob, run_prune

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "smollm2-135m"

# name -> (rotation, slicing, method); in priority order (most important first)
CONFIGS: dict[str, tuple[str | None, float, str | None]] = {
    "pca slice 30%": ("pca", 0.30, None),
    "wanda 50%": (None, 0.0, "wanda"),
    "learned + wanda 50%": ("learned", 0.0, "wanda"),
    "sparsegpt 50%": (None, 0.0, "sparsegpt"),
    "learned + sparsegpt 50%": ("learned", 0.0, "sparsegpt"),
    "pca + wanda 50%": ("pca", 0.0, "wanda"),
    "hadamard + wanda 50%": ("hadamard", 0.0, "wanda"),
    "pca slice 25%": ("pca", 0.25, None),
    "pca slice 20%": ("pca", 0.20, None),
    "pca + sparsegpt 50%": ("pca", 0.0, "sparsegpt"),
    "hadamard + sparsegpt 50%": ("hadamard", 0.0, "sparsegpt"),
    "learned (PCA start) + wanda 50%": ("learned", 0.0, "wanda"),
}
# learned-rotation options of a configuration (--rotate-option KEY=VALUE)
ROTATE_OPTIONS: dict[str, dict[str, Any]] = {"learned (PCA start) + wanda 50%": {"init": "pca"}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def job_for(name: str, out: Path | None = None) -> PruneJob:
    rotation, slicing, method = CONFIGS[name]
    return PruneJob(model=MODEL, method=method or "sparsegpt", sparsity=0.5 if method else None, rotation=rotation, slicing=slicing,
                    rotation_options=dict(ROTATE_OPTIONS.get(name, {})), evaluate=True, checkpoint=False,
                    out=str(out) if out else None, overwrite=out is not None)


def cli_for(job: PruneJob) -> str:
    parts = ["graphprune prune", f"--model {job.model}"]
    if job.rotation:
        parts.append(f"--rotate {job.rotation}")
        parts += [f"--rotate-option {k}={v}" for k, v in job.rotation_options.items()]
    if job.slicing:
        parts.append(f"--slice {job.slicing}")
    if job.prunes():
        parts.append(f"--method {job.method} --sparsity {job.sparsity}")
    return " ".join(parts + ["--eval"])


def run_config(name: str, run: Run, save_sliced: Path | None = None) -> dict[str, Any]:
    out = save_sliced if name == "pca slice 30%" else None
    job = job_for(name, out)
    outcome = run_prune(job, progress=False)
    rep = outcome.report
    rotation, slicing, method = CONFIGS[name]
    row: dict[str, Any] = {
        "rotation": rotation or "none",
        "slicing": slicing,
        "method": method or "none",
        "ppl": rep["ppl"],
        "ppl_news": rep["eval"]["news"]["ppl"],
        "achieved_sparsity": rep["achieved_sparsity"],
        "prune_seconds": rep["prune_seconds"],
        "rotation_seconds": rep.get("rotation_seconds", 0.0),
        "eval_seconds": rep["eval_seconds"],
        "width": int(outcome.gm.model.config.hidden_size),  # the stream's width after slicing
        "parameters_before": rep["parameters_before"],
        "parameters_after": rep["parameters_after"],
    }
    info = rep.get("rotation") or {}
    if info.get("source") == "learned":
        row["learned"] = {
            "objective": [info["objective_initial"], info["objective_final"]], "steps": info["steps"], "init": info["init"],
            "score": info["mask_score"], **{k: info[k] for k in ("holdout", "heldout_objective", "best_step", "stopped_at") if k in info},
        }
    if out is not None:  # end to end: the folder written by the pipeline reproduces the graph
        reloaded = load_model(str(out))
        probe = torch.randint(0, outcome.gm.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            again = reloaded.model(input_ids=probe, use_cache=False).logits
        row["reload_rel_diff"] = relative_diff(again, outcome.gm(probe))
        row["reload_parameters"] = parameter_count(reloaded.model)
    return run.stamp(row, cli=cli_for(job))


def _news(row: dict[str, Any]) -> str:
    return f"{row['ppl_news']:.3f}" if "ppl_news" in row else "-"


def _commit(row: dict[str, Any]) -> str:
    return f"`{str((row.get('provenance') or {}).get('commit', '?')).split(' ')[0]}`"


def write_markdown(rows: dict[str, Any], meta: dict[str, Any]) -> None:
    dense = json.loads((RESULTS / "dense.json").read_text()) if (RESULTS / "dense.json").exists() else None
    quality = json.loads((RESULTS / "prune_quality.json").read_text()) if (RESULTS / "prune_quality.json").exists() else {}
    # unrotated baselines measured by prune_quality.py when not measured here
    baseline = {k: v for k, v in quality.items() if k in ("wanda 50%", "sparsegpt 50%") and k not in rows}
    lines = [
        "# Rotations and slicing on SmolLM2-135M",
        "",
        f"Protocol: docs/PROTOCOL.md (64x512 calibration, seed 0; perplexity over 512-token windows of the evaluation split). "
        f"Machine: {meta['machine']}. `rotation s` is the one-time cost of the rotation, shared by the rows using it "
        "(statistics pass + PCA; learned adds Cayley SGD); `prune s` is the configuration's pass pipeline "
        "(fold, rotate, slice, calibrate, prune).",
        "",
        "Perplexity on the protocol text (`pydoc`, the calibration text's held-out split) and on the second text "
        "(`news`, English news prose nothing is fitted on); `-`: measured before the second text joined the protocol.",
        "",
        "| configuration | width | perplexity pydoc | vs. same method unrotated | perplexity news | vs. same method unrotated | sparsity | prune s | rotation s "
        "| parameters | commit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    if dense:
        lines.append(f"| dense | 576 | {dense['ppl']:.3f} | - | {_news(dense)} | - | 0 | - | - | {meta.get('dense_parameters', 0):,} | {_commit(dense)} |")
    for name in CONFIGS:
        r = rows.get(name)
        if r is None and name in baseline:
            b = baseline[name]
            lines.append(f"| {name} † | 576 | {b['ppl']:.3f} | - | {_news(b)} | - | {b['achieved_sparsity']:.3f} | {b['prune_seconds']:.0f} | 0 | "
                         f"{meta.get('dense_parameters', 0):,} | {_commit(b)} |")
            continue
        if r is None:
            continue
        base = (rows.get(f"{r['method']} 50%") or baseline.get(f"{r['method']} 50%")) if r["rotation"] != "none" and r["method"] != "none" else None
        delta = f"{(r['ppl'] / base['ppl'] - 1) * 100:+.1f}%" if base else "-"
        delta_news = f"{(r['ppl_news'] / base['ppl_news'] - 1) * 100:+.1f}%" if base and "ppl_news" in r and "ppl_news" in base else "-"
        lines.append(
            f"| {name} | {r['width']} | {r['ppl']:.3f} | {delta} | {_news(r)} | {delta_news} | {r['achieved_sparsity']:.3f} | {r['prune_seconds']:.0f} | "
            f"{r['rotation_seconds']:.0f} | {r['parameters_after']:,} | {_commit(r)} |"
        )
    for row_name, key, what in (("learned + wanda 50%", "learned", "for Wanda (masked-weight error of Wanda masks)"),
                                ("learned + sparsegpt 50%", "learned-obs",
                                 "for SparseGPT (Optimal Brain Surgeon saliency w²/[H⁻¹]_jj of the dropped weights)")):
        lm = (rows.get(row_name) or {}).get("learned") or meta.get(key)  # older rows kept it in meta
        if lm and "heldout_objective" in lm:
            trace = ", ".join(f"{step}: {value:.5f}" for step, value in lm["heldout_objective"])
            lines += ["", f"Learned rotation {what}: {lm['init']} start, up to {lm['steps']} Cayley SGD steps on "
                      f"{1 - lm['holdout']:.0%} of the calibration sequences; held-out objective (step: value) {trace}; "
                      f"stopped at step {lm['stopped_at']}, kept the rotation of step {lm['best_step']}; fit objective "
                      f"{lm['objective'][0]:.5f} -> {lm['objective'][1]:.5f}."]
        elif lm and "objective" in lm:
            lines += ["", f"Learned rotation {what}: {lm['steps']} Cayley SGD steps (lr {lm['lr']}, {lm.get('blocks_per_step', 4)} "
                      f"blocks per step), layer-wise objective {lm['objective'][0]:.5f} ({lm.get('init', 'pca')} start) -> "
                      f"{lm['objective'][1]:.5f}."]
    if baseline:
        lines += ["", "Unrotated rows marked † are taken from `prune_quality.json` (same protocol and pipeline)."]
    sliced = rows.get("pca slice 30%")
    if sliced and "reload_rel_diff" in sliced:
        lines += ["", f"The 30 % sliced model saved as a model folder reloads with {sliced['reload_parameters']:,} parameters; "
                  f"its logits match the graph's to a relative difference of {sliced['reload_rel_diff']:.1e}."]
    lines += ["", "Folding the final norm into the LM head unties SmolLM2's tied embedding, which adds 49152 x width "
              "parameters; the parameter counts include it."]
    lines += ["", "Commands (the equivalent `graphprune prune` call, or how older rows were made):", ""]
    for name, r in rows.items():
        p = r.get("provenance") or {}
        lines.append(f"* {name}: " + (f"`{p['cli']}`" if p.get("cli") else p.get("note", "?")) + f" (`{p.get('command', '?')}`)")
    (RESULTS / "rotations.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="configuration names")
    ap.add_argument("--force", action="store_true", help="recompute configurations already in the results")
    ap.add_argument("--save-sliced", default=None, help="write the 30 %% sliced model folder here (for benchmarks/latency.py)")
    ap.add_argument("--render", action="store_true", help="only rewrite rotations.md from the JSON")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "rotations.json"
    data = json.loads(out_json.read_text()) if out_json.exists() else {}
    rows: dict[str, Any] = data.get("rows", {})
    meta = dict(data.get("meta", {}))
    meta["machine"] = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch eager float32"
    run = Run()
    todo = [name for name in CONFIGS if (not args.only or name in args.only) and (args.force or name not in rows)]
    if args.render:
        todo = []
    save_sliced = Path(args.save_sliced) if args.save_sliced else None
    for name in todo:
        log(f"running {name}: {cli_for(job_for(name))}")
        rows[name] = run_config(name, run, save_sliced)
        meta["dense_parameters"] = rows[name]["parameters_before"]
        log(f"  {rows[name]}")
        out_json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float) + "\n")
        write_markdown(rows, meta)
    write_markdown(rows, meta)


if __name__ == "__main__":
    main()
