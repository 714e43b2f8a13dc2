"""Structured pruning of SmolLM2-135M: perplexity against measured speed-up, next to PCA slicing.

1. **Models.** For each setting in ``SETTINGS``: ``graphprune prune --structured F`` with each
   method (obs, obs-swap, wanda-sp, flap) at 10-50 % of the block parameters, uniform and
   adaptive budgets, MLP channels alone or with attention heads (``--structured-units``),
   structured + SparseGPT 50 % or 2:4 on the rest, and PCA slicing at 10-30 %
   (``--rotate pca --slice F``). Each folder is pruned once into ``--work`` and reused;
   ``--use NAME=DIR`` adds another folder.
2. **Quality.** Perplexity per docs/PROTOCOL.md (``prune --eval``).
3. **Speed, one interleaved run.** Every model is exported for generation to ONNX (KV cache,
   last-position logits; 32 greedy tokens checked against eager PyTorch) and timed in
   onnxruntime, and its transformers model in eager PyTorch (``generate`` with the KV cache),
   against the dense model: ``ttft-128`` (a 1x128 prefill to the first token) and
   ``decode-b1`` (64 tokens after it with the KV cache), paired repeat by repeat.
4. **Plot.** Perplexity against each speed-up (``structured.png``).

    python benchmarks/structured.py --prepare     # prune, evaluate, export (hours on 2 cores; resumable)
    python benchmarks/structured.py               # then the timing (about 30 minutes), nothing else running

Writes benchmarks/results/structured.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import generation_folder  # noqa: E402
from latency import say  # noqa: E402
from provenance import Run  # noqa: E402

from graphprune.bench import CASE_GROUPS, BenchTarget, bench_latency, machine_info, to_markdown  # noqa: E402
from graphprune.fileio import write_json, write_text  # noqa: E402
from graphprune.models import load_model  # noqa: E402
from graphprune.pipeline import EvalJob, PruneJob, run_eval, run_prune  # noqa: E402
from graphprune.pipeline.export_bench import load_average, summary_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: name -> PruneJob fields (beyond the model and the protocol's calibration)
SETTINGS: dict[str, dict[str, Any]] = {
    **{f"obs-{p}": {"structured": p / 100} for p in (10, 20, 30, 40, 50)},
    "obs-20-adaptive": {"structured": 0.2, "structured_budget": "adaptive"},
    "obs-40-adaptive": {"structured": 0.4, "structured_budget": "adaptive"},
    "obs-swap-40": {"structured": 0.4, "structured_method": "obs-swap"},
    **{f"{m}-{p}": {"structured": p / 100, "structured_method": m} for m in ("wanda-sp", "flap") for p in (20, 30, 40)},
    **{f"{m}-40-adaptive": {"structured": 0.4, "structured_method": m, "structured_budget": "adaptive"} for m in ("wanda-sp", "flap")},
    "obs-30-heads": {"structured": 0.3, "structured_units": "mlp+heads"},
    "obs-40-heads": {"structured": 0.4, "structured_units": "mlp+heads"},
    "obs-30-kv": {"structured": 0.3, "structured_units": "mlp+kv-groups"},
    "wanda-sp-40-heads": {"structured": 0.4, "structured_method": "wanda-sp", "structured_units": "mlp+heads"},
    "flap-40-heads": {"structured": 0.4, "structured_method": "flap", "structured_units": "mlp+heads"},
    "obs-20+sparsegpt-50": {"structured": 0.2, "method": "sparsegpt", "sparsity": 0.5},
    "obs-20+sparsegpt-2:4": {"structured": 0.2, "method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
    **{f"sliced-{p}": {"rotation": "pca", "slicing": p / 100} for p in (10, 20, 30)},
}


def pruned(name: str, fields: dict[str, Any], model: str, work: Path) -> dict[str, Any]:
    """Prune (or reuse) one setting; returns its folder, perplexity and structured report."""
    folder = work / name
    report_file = folder / "report.json"
    if not report_file.is_file():
        say(f"{name}: pruning {fields} ...")
        run_prune(PruneJob(model=model, out=str(folder), evaluate=True, overwrite=True, **fields), progress=False)
    else:
        say(f"{name}: reusing {folder}")
    rep = json.loads(report_file.read_text())
    st = rep.get("structured") or {}
    layers = st.get("layers", [])
    mlp = [e for e in layers if e.get("kind", "mlp") == "mlp"]
    heads = [e for e in layers if e.get("kind") == "heads"]
    return {
        "folder": str(folder),
        "fields": fields,
        "ppl": rep["ppl"],
        "parameters": rep["parameters_after"],
        "block_parameters_removed": st.get("block_parameters_removed"),
        "mlp_width": sorted({e["kept"] for e in mlp}),
        "heads": sorted({f"{len(e['kept_heads'])}/{len(e['kept_kv_heads'])}" for e in heads}),
        "mean_rel_error": (sum(e["rel_error"] for e in mlp) / len(mlp)) if mlp else None,
        "sparsity": rep.get("achieved_sparsity"),
        "prune_seconds": rep["prune_seconds"],
    }


def _cell(name: str, ratios: dict[str, tuple[float, float, float]], case: str) -> str:
    if name == "dense":
        return "1.00x"
    s = ratios.get(case)
    return f"{s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}]" if s else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default=str(ROOT / "out" / "structured"), help="folder for the pruned folders and exports (reused when present)")
    ap.add_argument("--only", nargs="+", default=list(SETTINGS), help="settings to run (names of SETTINGS)")
    ap.add_argument("--use", action="append", default=[], metavar="NAME=DIR", help="another pruned folder to include (e.g. sliced-30)")
    ap.add_argument("--cases", nargs="+", default=["ttft-128", "decode-b1"])
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "eager"], choices=["onnxruntime", "eager"])
    ap.add_argument("--prepare", action="store_true", help="only prune, evaluate and export what is missing; no timing")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--load-note", default="")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    run = Run()
    work = Path(args.work)
    files_dir = work / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in args.only if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {list(SETTINGS)}")

    dense = run_eval(EvalJob(model=args.model), progress=False)
    models: dict[str, dict[str, Any]] = {"dense": {"folder": args.model, "ppl": dense["ppl"], "fields": {}}}
    for name in args.only:
        models[name] = pruned(name, SETTINGS[name], args.model, work)
    for item in args.use:
        name, folder = item.split("=", 1)
        rep_file = Path(folder) / "report.json"
        ppl = json.loads(rep_file.read_text()).get("ppl") if rep_file.is_file() else None
        if ppl is None:
            say(f"{name}: perplexity of {folder} ...")
            ppl = run_eval(EvalJob(model=folder), progress=False)["ppl"]
        models[name] = {"folder": folder, "ppl": ppl, "fields": {"use": folder}}

    targets = []
    for name, m in models.items():
        lm = load_model(m["folder"])
        m["parameters"] = sum(p.numel() for p in lm.model.parameters())
        m["file"] = generation_folder(name, lm.model, lm.tokenizer, files_dir, "onnx", f"{m['folder']}:{json.dumps(m['fields'], sort_keys=True)}")
        targets.append(BenchTarget(name, model=lm.model, generation={"onnxruntime": m["file"]["folder"]}))
    if args.prepare:
        say(f"prepared {len(targets)} models in {work}; run again without --prepare for the timing")
        return

    cases = [c for name in args.cases for c in CASE_GROUPS[name]]
    load: dict[str, Any] = {"start": load_average()}
    say(f"{', '.join(args.runtimes)}: {', '.join(args.cases)} for {len(targets)} models, {args.repeats} repeats ...")
    result = bench_latency(targets, args.runtimes, cases, repeats=args.repeats, warmup=args.warmup, progress=False)
    load["end"] = load_average()
    ratios: dict[str, dict[str, tuple[float, float, float]]] = {}
    for rec in result.records:
        ratios.setdefault(rec.target, {})[f"{rec.case} {rec.runtime}"] = (rec.speedup, rec.speedup_q1, rec.speedup_q3)
    columns = [f"{c.name} {rt}" for rt in args.runtimes for c in cases]
    machine = machine_info()
    provenance = run.stamp({})["provenance"]
    rows = [
        "| model | perplexity | parameters | block params removed | MLP width | heads (query/KV) | " + " | ".join(f"{c} speedup" for c in columns) + " |",
        "|---|---:|---:|---:|---|---|" + "---|" * len(columns),
    ]
    for name, m in models.items():
        sp = ratios.get(name, {})
        removed = m.get("block_parameters_removed")
        widths = m.get("mlp_width") or []
        width = "-" if not widths else (str(widths[0]) if len(widths) == 1 else f"{min(widths)}-{max(widths)} (per block)")
        rows.append(
            f"| {name} | {m['ppl']:.3f} | {m['parameters']:,} | {'-' if removed is None else f'{removed:.1%}'} | {width} | "
            f"{', '.join(m.get('heads') or []) or '-'} | " + " | ".join(_cell(name, sp, c) for c in columns) + " |"
        )
    data = {
        "provenance": provenance,
        "machine": machine,
        "load_average": load,
        "load_note": args.load_note,
        "runtimes": args.runtimes,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "models": models,
        "records": result.to_dicts(),
    }
    md = [
        f"# Structured pruning of {args.model}: perplexity and measured speed-up",
        "",
        f"Generated by `{provenance['command']}` at commit {provenance['commit']} ({provenance['date']}). Machine: "
        f"{machine['cpu']}, {machine['usable_cores']} usable cores, onnxruntime {machine['onnxruntime']} (CPUExecutionProvider, "
        f"spin-waiting off), float32. Load average (1, 5, 15 min) {load['start']} at the start of the timing, {load['end']} at "
        f"the end. {args.load_note}",
        "",
        "Perplexity per docs/PROTOCOL.md. Speed-ups: median of the paired per-repeat ratios (dense time / model time) "
        f"[interquartile range] over {args.repeats} repeats after {args.warmup} warm-up run; onnxruntime: every model as a "
        "generation export (ONNX, KV cache, last-position logits); eager: the transformers model in PyTorch with its KV cache; "
        "ttft-128: a 1x128 prompt to the first token; decode-b1: 64 tokens after it with the KV cache. obs/wanda-sp/flap-N: "
        "N % of the block parameters removed as MLP channels (uniform widths, multiples of 8; -adaptive: per-block widths "
        "under one budget); -heads: MLP channels and one query head of each KV group per 1/3 of the attention (mlp+heads); "
        "-kv: whole KV groups (mlp+kv-groups); +sparsegpt: SparseGPT on what remains; sliced-N: PCA rotation, N % of the "
        "stream sliced. Plot: [structured.png](structured.png).",
        "",
        "\n".join(rows),
        "",
        "## Timing table",
        "",
        summary_table(result),
        "## All records",
        "",
        to_markdown(result),
    ]
    out = Path(args.results)
    write_json(out / "structured.json", data)
    write_text(out / "structured.md", "\n".join(md))
    plot(models, ratios, columns, out / "structured.png", f"{args.model}, commit {provenance['commit'][:12]}, {provenance['date'][:10]}")
    say(f"wrote {out / 'structured.md'}, structured.json, structured.png")


def _family(name: str) -> str:
    if name == "dense":
        return "dense"
    if name.startswith("sliced"):
        return "PCA slicing"
    if "+" in name:
        return "structured + SparseGPT"
    if name.endswith("-heads") or name.endswith("-kv"):
        return "MLP + heads"
    if "adaptive" in name:
        return "adaptive budget"
    return name.rsplit("-", 1)[0]


def plot(models: dict[str, dict[str, Any]], ratios: dict[str, dict[str, tuple[float, float, float]]], columns: list[str], path: Path, title: str) -> None:
    """Perplexity (log scale) against each measured speed-up, one panel per case and runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 4.4), sharey=True, squeeze=False)
    families = sorted({_family(n) for n in models})
    markers = dict(zip(families, "o^sDvP*Xh<>", strict=False))
    for ax, col in zip(axes[0], columns, strict=True):
        for fam in families:
            pts = [(1.0 if n == "dense" else ratios.get(n, {}).get(col, (None,))[0], m["ppl"], n) for n, m in models.items() if _family(n) == fam]
            pts = [p for p in pts if p[0] is not None]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[fam], label=fam, s=36)
            for x, y, n in pts:
                ax.annotate(n, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel(f"speed-up over dense, {col}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("perplexity (docs/PROTOCOL.md)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Structured pruning vs PCA slicing: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
