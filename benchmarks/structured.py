"""Structured pruning of SmolLM2-135M: perplexity against measured speed-up, next to PCA slicing.

1. **Models.** ``graphprune prune --structured F`` (MLP channels, uniform widths) for each
   setting in ``SETTINGS`` (method x fraction of the block parameters), plus structured +
   SparseGPT 50 % on the rest; each folder is pruned once into ``--work`` and reused. PCA
   slicing 30 % comes from ``--use sliced-30=DIR`` (``graphprune prune --rotate pca --slice 0.3``).
2. **Quality.** Perplexity per docs/PROTOCOL.md (``prune --eval``; ``graphprune eval`` for the
   slicing folder).
3. **Speed, one interleaved run.** Every model is exported for generation to ONNX (KV cache,
   last-position logits; 32 greedy tokens checked against eager PyTorch) and timed in
   onnxruntime against the dense model's export: ``ttft-128`` (a 1x128 prefill to the first
   token) and ``decode-b1`` (64 tokens after it with the KV cache), paired repeat by repeat.

    python benchmarks/structured.py --use sliced-30=DIR     # about 50 minutes on 2 cores

Writes benchmarks/results/structured.{md,json}.
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
    "obs-20": {"structured": 0.2},
    "obs-30": {"structured": 0.3},
    "obs-40": {"structured": 0.4},
    "obs-20-adaptive": {"structured": 0.2, "structured_budget": "adaptive"},
    "obs-40-adaptive": {"structured": 0.4, "structured_budget": "adaptive"},
    "wanda-sp-40": {"structured": 0.4, "structured_method": "wanda-sp"},
    "flap-40": {"structured": 0.4, "structured_method": "flap"},
    "obs-swap-40": {"structured": 0.4, "structured_method": "obs-swap"},
    "obs-20+sparsegpt-50": {"structured": 0.2, "method": "sparsegpt", "sparsity": 0.5},
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
    return {
        "folder": str(folder),
        "fields": fields,
        "ppl": rep["ppl"],
        "parameters": rep["parameters_after"],
        "block_parameters_removed": st.get("block_parameters_removed"),
        "mlp_width": sorted({e["kept"] for e in st.get("layers", [])}),
        "mean_rel_error": (sum(e["rel_error"] for e in st["layers"]) / len(st["layers"])) if st.get("layers") else None,
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

    cases = [c for name in args.cases for c in CASE_GROUPS[name]]
    load: dict[str, Any] = {"start": load_average()}
    say(f"onnxruntime: {', '.join(args.cases)} for {len(targets)} models, {args.repeats} repeats ...")
    result = bench_latency(targets, ["onnxruntime"], cases, repeats=args.repeats, warmup=args.warmup, progress=False)
    load["end"] = load_average()
    ratios: dict[str, dict[str, tuple[float, float, float]]] = {}
    for rec in result.records:
        ratios.setdefault(rec.target, {})[rec.case] = (rec.speedup, rec.speedup_q1, rec.speedup_q3)
    machine = machine_info()
    provenance = run.stamp({})["provenance"]
    rows = [
        "| model | perplexity | parameters | block params removed | MLP width | ttft-128 speedup | decode-b1 speedup |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for name, m in models.items():
        sp = ratios.get(name, {})
        removed = m.get("block_parameters_removed")
        rows.append(
            f"| {name} | {m['ppl']:.3f} | {m['parameters']:,} | {'-' if removed is None else f'{removed:.1%}'} | "
            f"{', '.join(map(str, m.get('mlp_width') or [])) or '-'} | {_cell(name, sp, cases[0].name)} | {_cell(name, sp, cases[-1].name)} |"
        )
    data = {
        "provenance": provenance,
        "machine": machine,
        "load_average": load,
        "load_note": args.load_note,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "models": models,
        "records": result.to_dicts(),
    }
    md = [
        f"# Structured pruning of {args.model}: perplexity and measured speed-up in onnxruntime",
        "",
        f"Generated by `{provenance['command']}` at commit {provenance['commit']} ({provenance['date']}). Machine: "
        f"{machine['cpu']}, {machine['usable_cores']} usable cores, onnxruntime {machine['onnxruntime']} (CPUExecutionProvider, "
        f"spin-waiting off), float32. Load average (1, 5, 15 min) {load['start']} at the start of the timing, {load['end']} at "
        f"the end. {args.load_note}",
        "",
        "Perplexity per docs/PROTOCOL.md. Speed-ups: median of the paired per-repeat ratios (dense time / model time) "
        f"[interquartile range] over {args.repeats} repeats after {args.warmup} warm-up run, every model as a generation export "
        "(ONNX, KV cache, last-position logits) in onnxruntime; ttft-128: a 1x128 prompt to the first token; decode-b1: 64 "
        "tokens after it with the KV cache. Structured settings remove MLP channels only (uniform widths, multiples of 8).",
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
    say(f"wrote {out / 'structured.md'}, structured.json")


if __name__ == "__main__":
    main()
