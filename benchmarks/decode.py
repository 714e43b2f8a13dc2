"""Generation speed of dense vs pruned SmolLM2-135M on CPU: time to first token and cached decode.

Protocol (docs/PROTOCOL.md, "Latency"): every model is exported for generation
(``graphprune export --for generation``: KV cache, last-position logits) to ONNX and
TorchScript, each file checked by 32 greedy tokens against eager PyTorch; then
``bench_latency`` times, per runtime, the cases

* ``ttft-128`` / ``ttft-512``: a 128- / 512-token prompt to the first generated token;
* ``decode-b1`` / ``decode-b8``: 64 greedy tokens after a 128-token prompt, batch 1 and 8,
  with the KV cache (the time of the 63 steps after the first token; tokens per second are
  ``batch * 64 / time``);

with the models interleaved repeat by repeat and every ratio paired (dense time / model
time of the same repeat), in eager PyTorch, TorchScript and onnxruntime (spin-waiting off).

Models: ``dense``; ``sparsegpt-50`` and ``sparsegpt-2of4`` (the folders benchmarks/latency.py
prunes into ``--models-dir``, made here if missing); ``sliced-30`` if
``<models-dir>/smollm2-sliced-30`` exists (``python benchmarks/rotations.py --only "pca slice
30%" --force --save-sliced out/bench-models/smollm2-sliced-30``).

    python benchmarks/decode.py                      # about 20 minutes on 2 cores
    python benchmarks/decode.py --model tiny-llama --repeats 2 --results /tmp/decode   # smoke run

Writes benchmarks/results/decode.{md,json,png}.
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

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import PATTERNS, SLICED_SUFFIX, cache_key, folder_stem, pruned_folder, say  # noqa: E402
from provenance import Run  # noqa: E402

from graphprune.bench import CASE_GROUPS, BenchTarget, bench_latency, machine_info, to_markdown  # noqa: E402
from graphprune.bench.report import write_plot  # noqa: E402
from graphprune.exporters.generation import export_generation  # noqa: E402
from graphprune.fileio import write_json, write_text  # noqa: E402
from graphprune.models import load_model  # noqa: E402
from graphprune.pipeline.export_bench import linear_sparsity, load_average, mib, summary_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: generation files of pruned models: logits grow with pruning, float32 reassociation over 30 layers
ATOL = 1e-2
FORMATS = {"onnxruntime": "onnx", "torchscript": "torchscript"}


def generation_folder(name: str, model: torch.nn.Module, tokenizer: Any, files_dir: Path, fmt: str, source: str) -> dict[str, Any]:
    """The checked generation export of ``model`` (reused when made from the same source by the same code)."""
    folder = files_dir / f"{name}-generation-{fmt}-{cache_key(source, fmt)}"
    report = folder / "export.json"
    if report.is_file():
        say(f"{name}: reusing {folder}")
        return dict(json.loads(report.read_text()))
    say(f"{name}: {fmt} generation export (32 greedy tokens checked against eager) ...")
    rep = export_generation(model, folder, format=fmt, tokenizer=tokenizer, check_tokens=32, atol=ATOL, overwrite=True)
    out = {
        "folder": str(folder),
        "bytes": rep.bytes,
        "tokens_equal": rep.tokens_equal,
        "ties": rep.tie_divergences,
        "max_abs_diff": rep.max_abs_diff,
        "seconds": round(rep.seconds, 1),
    }
    write_json(report, out)
    return out


def files_table(targets: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | weight sparsity | parameters | ONNX (KV cache) | greedy check ONNX | TorchScript (KV cache) | greedy check TorchScript |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for name, t in targets.items():
        cells = []
        for fmt in ("onnx", "torchscript"):
            f = t["files"].get(fmt)
            if f is None:
                cells += ["-", "-"]
                continue
            agree = "same 32 tokens" if f["tokens_equal"] else f"same up to a tie at step {f['ties'][0]['step']}"
            cells += [mib(f["bytes"]), f"{agree}, max abs Δlogits {f['max_abs_diff']:.1e}"]
        lines.append(f"| {name} | {t['sparsity']:.3f} | {t['parameters']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", default=str(ROOT / "out" / "bench-models"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="sparsegpt", help="pruning method of the 50 %% and 2:4 models")
    ap.add_argument("--runtimes", nargs="+", default=["eager", "torchscript", "onnxruntime"])
    ap.add_argument("--cases", nargs="+", default=["ttft", "decode"], help="case names or groups (graphprune bench --cases)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--load-note", default="", help="free text about the machine's load, written into the results")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument(
        "--use", action="append", default=[], metavar="NAME=DIR",
        help="use this pruned folder for NAME (e.g. sparsegpt-50=out/bench-models/smollm2-sparsegpt-50-<key>) instead of the one keyed by this commit",
    )
    args = ap.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    run = Run()
    cases = [c for name in args.cases for c in CASE_GROUPS[name]]
    models_dir = Path(args.models_dir)
    files_dir = models_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)

    loaded = {"dense": load_model(args.model)}
    sources = {"dense": f"load_model({args.model!r})"}
    given = dict(item.split("=", 1) for item in args.use)
    for suffix in PATTERNS:
        name = f"{args.method}-{suffix}"
        folder = Path(given[name]) if name in given else pruned_folder(models_dir, args.model, args.method, suffix)
        loaded[name] = load_model(str(folder))
        sources[name] = f"run_prune -> {folder.name}"
    sliced = models_dir / f"{folder_stem(args.model)}-{SLICED_SUFFIX}"
    if (sliced / "config.json").is_file():
        loaded["sliced-30"] = load_model(str(sliced))
        sources["sliced-30"] = str(sliced)

    targets: dict[str, dict[str, Any]] = {}
    for name, lm in loaded.items():
        files = {
            fmt: generation_folder(name, lm.model, lm.tokenizer, files_dir, fmt, sources[name])
            for runtime, fmt in FORMATS.items()
            if runtime in args.runtimes
        }
        targets[name] = {
            "source": sources[name],
            "parameters": sum(p.numel() for p in lm.model.parameters()),
            **linear_sparsity(lm.model),
            "files": files,
        }

    load: dict[str, Any] = {"start": load_average()}
    results = []
    for runtime in args.runtimes:
        say(f"{runtime}: {', '.join(c.name for c in cases)}, {args.repeats} repeats ...")
        bench_targets = [
            BenchTarget(name, model=lm.model, generation={r: targets[name]["files"][f]["folder"] for r, f in FORMATS.items() if f in targets[name]["files"]})
            for name, lm in loaded.items()
        ]
        results.append(bench_latency(bench_targets, [runtime], cases, repeats=args.repeats, warmup=args.warmup, progress=False))
        load[f"after_{runtime}"] = load_average()
    load["end"] = load_average()
    everything = results[0]
    everything.records = [r for res in results for r in res.records]
    machine = machine_info()
    provenance = run.stamp({})["provenance"]
    out = Path(args.results)
    data = {
        "provenance": provenance,
        "machine": machine,
        "load_average": load,
        "load_note": args.load_note,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "targets": targets,
        "records": everything.to_dicts(),
    }
    md = [
        f"# Generation speed: dense vs pruned {args.model} on CPU (time to first token, decode with a KV cache)",
        "",
        f"Generated by `{provenance['command']}` at commit {provenance['commit']} ({provenance['date']}). Machine: "
        f"{machine['cpu']}, {machine['usable_cores']} usable cores, torch {machine['torch']} ({machine['torch_threads']} threads), "
        f"onnxruntime {machine['onnxruntime']} (CPUExecutionProvider, spin-waiting off), float32. Load average (1, 5, 15 min) "
        f"{load['start']} at the start, {load['end']} at the end. {args.load_note}",
        "",
        "## Speedup vs dense, side by side",
        "",
        f"Median of the paired per-repeat ratios (dense time / model time) [interquartile range] over {args.repeats} "
        f"repeats after {args.warmup} warm-up run; > 1 is faster. Decode cells also give the model's tokens per second "
        "(all rows of the batch, median run). ttft: prompt to first token (prefill with an empty cache, LM head on the "
        "last position only); decode: the 63 cached steps after the first of 64 tokens.",
        "",
        summary_table(everything),
        "## Files",
        "",
        "Generation exports (`export_generation`: `input_ids`, `attention_mask`, `position_ids` and the past keys/values "
        "in; last-position logits and present keys/values out). Check: greedy decoding of 32 tokens from two prompts of "
        "different lengths in one left-padded batch, file vs eager PyTorch.",
        "",
        files_table(targets),
        "## All records",
        "",
        to_markdown(everything),
    ]
    write_json(out / "decode.json", data)
    write_text(out / "decode.md", "\n".join(md))
    write_plot(everything, out / "decode.png", title=f"{args.model}: generation speedup vs dense ({machine['cpu']})")
    say(f"wrote {out / 'decode.md'}, decode.json, decode.png")


if __name__ == "__main__":
    main()
