"""Latency of dense vs pruned SmolLM2-135M in torch eager, TorchScript and onnxruntime (CPU), plus file sizes.

Protocol (docs/PROTOCOL.md): speed figures are ratios measured side by side in one run --
within each runtime and case the models are interleaved repeat by repeat and every
ratio is paired (dense time / model time of the same repeat); median and interquartile
range are reported, with the machine and its load average. Cases: prefill 1x128,
single-token step-nocache 1x1 (no KV cache: the exported graphs take ``input_ids`` only; decoding with the cache is benchmarks/decode.py),
throughput 8x512 (fewer repeats: one run is ~100x a prefill).

Models:
* ``dense``: ``load_model("smollm2-135m")``;
* ``sparsegpt-50`` and ``sparsegpt-2of4``: pruned with ``run_prune`` (64x512 calibration,
  seed 0) into ``--models-dir`` unless already there (``--method magnitude`` gives the same
  zero patterns in seconds instead of the calibration's hour on 2 cores: the dense
  runtimes' speed and the sparse file sizes depend on the pattern and sparsity only);
* ``sliced-30`` (optional): a 30 %-sliced folder given with ``--sliced`` (or found as
  ``<models-dir>/smollm2-sliced-30``) -- the slicing pass lives in
  ``graphprune/passes/slice.py``;
* ``<method>-50-kernels`` only if ``RewriteKernelsPass`` (measured at 128 tokens)
  rewrites any Linear to a sparse kernel; its choices are reported either way.

Files: every model is exported to ONNX (parity checked in onnxruntime) without and, for
the pruned ones, with sparse initializers; the onnxruntime runs use the plain files plus
the sparse-initializer file of the 50 % model (to show whether the compact storage costs
time). TorchScript files are traced and checked in a fresh process.

    python benchmarks/latency.py                          # everything (about an hour on 2 busy cores)
    python benchmarks/latency.py --repeats 5 --throughput-repeats 2 --models-dir /tmp/gp-bench
    python benchmarks/latency.py --sliced out/smollm2-sliced-30

Writes benchmarks/results/latency.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # no library progress bars in the (long, usually redirected) log

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import Run, commit  # noqa: E402

from graphprune.bench import BenchResult, BenchTarget, Case, bench_latency, machine_info, to_markdown  # noqa: E402
from graphprune.bench.report import atomic_write, write_plot  # noqa: E402
from graphprune.exporters import export_onnx, export_torchscript  # noqa: E402
from graphprune.graph.model import GraphModel  # noqa: E402
from graphprune.models import load_model  # noqa: E402
from graphprune.passes.infra import PassContext, PassManager, Prop  # noqa: E402
from graphprune.passes.rewrite_kernels import RewriteKernelsPass  # noqa: E402
from graphprune.pipeline import PruneJob, run_prune  # noqa: E402
from graphprune.pipeline.export_bench import linear_sparsity, load_average, mib, summary_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: absolute logits tolerance of the parity checks: float32 reassociation across 30 layers gives
#: ~1e-4 on the dense model, ~1e-3 on a magnitude-pruned one (whose logits grow); the measured
#: differences are reported in the files table
ATOL = 1e-2
SHORT_CASES = (Case("prefill", 1, 128), Case("step-nocache", 1, 1))
THROUGHPUT = Case("throughput", 8, 512)
PATTERNS = {"50": {"sparsity": 0.5}, "2of4": {"pattern": "2:4"}}  # label suffix -> PruneJob fields
SLICED_SUFFIX = "sliced-30"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def folder_stem(model: str) -> str:
    return "smollm2" if model == "smollm2-135m" else Path(model).name


def cache_key(*parts: Any) -> str:
    """12 hex digits over everything that decides a cached file's content: the settings given and
    the graphprune code it was made with (the commit, ``+dirty`` included)."""
    blob = json.dumps([*parts, commit()], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def pruned_folder(models_dir: Path, model: str, method: str, suffix: str) -> Path:
    label = f"{method}-{suffix}"
    # magnitude uses no calibration statistics: its masks are the same for any calibration set
    calib = {} if method != "magnitude" else {"calib_samples": 1, "calib_len": 32}
    job = PruneJob(model=model, method=method, **PATTERNS[suffix], **calib)
    folder = models_dir / f"{folder_stem(model)}-{label}-{cache_key(asdict(job))}"
    if (folder / "config.json").is_file():
        say(f"{label}: using {folder} (same job, same code)")
        return folder
    job.out = str(folder)
    say(f"{label}: pruning into {folder} ({method}, {calib or '64x512 calibration'}, seed 0) ...")
    run_prune(job, progress=False)
    return folder


def kernel_choice(model: torch.nn.Module, tokens: int) -> tuple[dict[str, Any], torch.nn.Module | None]:
    """Run RewriteKernelsPass on a copy of ``model`` (masks = its zeros); return stats and the model if rewritten."""
    model = copy.deepcopy(model)
    gm = GraphModel.capture(model)
    # a saved folder carries no masks: its zeros are the mask
    gm.state.masks = {li.name: gm.get_attr(li.weight) != 0 for li in gm.block_linears()}
    gm.props.add(Prop.PRUNED)
    manager = PassManager([RewriteKernelsPass(device="cpu", tokens=tokens)], PassContext(progress=False))
    gm = manager.run(gm)
    stats = manager.report()[0]
    per_kind: dict[str, dict[str, Any]] = {}
    for name, entry in gm.state.kernels.items():
        agg = per_kind.setdefault(name.rsplit(".", 1)[-1], {"linears": 0, "csr_chosen": 0, "ratios": []})
        agg["linears"] += 1
        agg["csr_chosen"] += int(entry["choice"] == "csr")
        times = entry["times"][str(tokens)]
        agg["ratios"].append(times.get("csr", float("nan")) / times["dense"])
    for agg in per_kind.values():
        agg["median_csr_over_dense"] = statistics.median(agg["ratios"])
    stats["per_linear_kind"] = per_kind
    return stats, (gm.model if stats["rewritten"] else None)


def sparse_copy(plain: Path, out: Path, vocab: int) -> dict[str, Any]:
    """``plain`` re-encoded with sparse initializers (no second torch export), checked against it in onnxruntime.

    ``plain`` was itself checked against PyTorch by ``export_onnx``; ``graphprune export
    --sparse-initializers`` does the same re-encoding inside the export.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    from graphprune.exporters import sparsify_initializers

    proto = onnx.load(str(plain))
    stats = sparsify_initializers(proto, "auto")
    onnx.save_model(proto, str(out))
    onnx.checker.check_model(str(out), full_check=stats.coo == 0)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).numpy()
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], {"input_ids": ids})[0] for p in (plain, out)]
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "max_abs_diff_vs_plain": float(np.abs(runs[0] - runs[1]).max()),
        "bitmask_tensors": stats.bitmask,
        "coo_tensors": stats.coo,
    }


def export_files(name: str, model: torch.nn.Module, files_dir: Path, *, onnx: bool, sparse: bool, reuse: bool, source: str) -> dict[str, Any]:
    """ONNX (+ sparse initializers) and TorchScript files of ``model`` with their parity checks.

    With ``reuse``, files whose report (``<name>.files.json``, written only after every check
    passed) exists are not exported again -- if it was written for the same ``source`` (the model
    folder or name) by the same code (:func:`cache_key`).
    """
    record = files_dir / f"{name}.files.json"
    key = cache_key(source, onnx, sparse)
    if reuse and record.is_file():
        out = json.loads(record.read_text())
        if out.pop("key", None) == key and all(Path(v["path"]).is_file() for v in out.values()):
            say(f"{name}: reusing the files listed in {record}")
            return out
    out: dict[str, Any] = {}
    if onnx:
        say(f"{name}: ONNX export (parity in onnxruntime) ...")
        rep = export_onnx(model, files_dir / f"{name}.onnx", atol=ATOL)
        out["onnx"] = {"path": str(rep.path), "bytes": rep.bytes, "max_abs_diff": rep.max_abs_diff, "seconds": rep.seconds}
        if sparse:
            say(f"{name}: ONNX with sparse initializers ...")
            out["onnx_sparse"] = sparse_copy(rep.path, files_dir / f"{name}.sparse.onnx", model.config.vocab_size)
    say(f"{name}: TorchScript trace (parity in a fresh process) ...")
    rep = export_torchscript(model, files_dir / f"{name}.pt", atol=ATOL)
    out["torchscript"] = {"path": str(rep.path), "bytes": rep.bytes, "max_abs_diff": rep.max_abs_diff, "seconds": rep.seconds}
    atomic_write(record, (json.dumps({**out, "key": key}, indent=2) + "\n").encode())
    return out


def merge(results: list[BenchResult]) -> BenchResult:
    first = results[0]
    records = [r for res in results for r in res.records]
    return replace(first, records=records)


def files_table(targets: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | weight sparsity | ONNX | ONNX, sparse initializers | ratio | max abs Δlogits ONNX (sparse vs plain) | TorchScript | max abs Δlogits TorchScript |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in targets.items():
        f = t["files"]
        if "onnx" not in f:  # kernels target: ONNX would lower it to the 50 % model's file
            lines.append(
                f"| {name} | {t['sparsity']:.3f} | - | - | - | - | {mib(f['torchscript']['bytes'])} | "
                f"{f['torchscript']['max_abs_diff']:.1e} |"
            )
            continue
        sp = f.get("onnx_sparse")
        sparse_cells = [mib(sp["bytes"]), f"{sp['bytes'] / f['onnx']['bytes']:.2f}x"] if sp else ["-", "-"]
        diff = f"{f['onnx']['max_abs_diff']:.1e}" + (f" ({sp['max_abs_diff_vs_plain']:.1e})" if sp else "")
        lines.append(
            f"| {name} | {t['sparsity']:.3f} | {mib(f['onnx']['bytes'])} | {' | '.join(sparse_cells)} | "
            f"{diff} | {mib(f['torchscript']['bytes'])} | {f['torchscript']['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def kernels_section(stats: dict[str, Any], name: str) -> str:
    tokens = (stats.get("prefill_tokens") or [None])[0] or stats.get("tokens")
    dense = stats["linear_seconds_dense"]
    chosen = stats["linear_seconds_chosen"]
    if isinstance(dense, dict):  # per token count
        dense, chosen = dense[str(tokens)], chosen[str(tokens)]
    lines = [
        f"`RewriteKernelsPass(tokens={tokens})` on {name} measured dense vs CSR for each of its "
        f"{stats['linears']} pruned Linears (`x [{tokens}, in]`, median of 20 runs, a sparse win re-measured "
        f"before it counts; BSR needs >= 50 % all-zero "
        f"blocks and 2:4 semi-structured needs CUDA, so neither applies here). Choices: {stats['choices']}; "
        f"sum of per-Linear medians: dense {dense * 1e3:.1f} ms, chosen "
        f"{chosen * 1e3:.1f} ms.",
        "",
        "| Linear | count | CSR chosen | CSR time / dense time (median over layers) [min, max] |",
        "|---|---:|---:|---:|",
    ]
    for kind, agg in stats["per_linear_kind"].items():
        r = agg["ratios"]
        lines.append(
            f"| {kind} | {agg['linears']} | {agg['csr_chosen']} | {agg['median_csr_over_dense']:.2f} [{min(r):.2f}, {max(r):.2f}] |"
        )
    return "\n".join(lines) + "\n"


def findings(result: BenchResult, targets: dict[str, dict[str, Any]], kernels: dict[str, Any], fifty: str) -> str:
    """Plain statements read off the records: where the interquartile range of a ratio excludes 1."""
    out = [
        "A ratio counts as a difference only when its interquartile range excludes 1.0 (with "
        "the throughput case's few repeats this is a weak test)."
    ]
    for name in [t for t in dict.fromkeys(r.target for r in result.records) if t != result.baseline]:
        recs = [r for r in result.records if r.target == name]
        faster = [f"{r.case}/{r.runtime} {r.speedup:.2f}x" for r in recs if r.speedup_q1 > 1.0]
        slower = [f"{r.case}/{r.runtime} {r.speedup:.2f}x" for r in recs if r.speedup_q3 < 1.0]
        same = len(recs) - len(faster) - len(slower)
        line = f"* **{name}** vs dense: {same} of {len(recs)} (case, runtime) pairs show no difference beyond the spread"
        if faster:
            line += "; faster: " + ", ".join(faster)
        if slower:
            line += "; slower: " + ", ".join(slower)
        out.append(line + ".")
    for name, t in targets.items():
        sp = t["files"].get("onnx_sparse")
        if sp:
            out.append(
                f"* {name}: sparse initializers store the ONNX file in {sp['bytes'] / t['files']['onnx']['bytes']:.2f}x "
                f"of the plain file's bytes ({mib(t['files']['onnx']['bytes'])} -> {mib(sp['bytes'])}); max |Δlogits| "
                f"between the two files {sp['max_abs_diff_vs_plain']:.1e}."
            )
    chosen = sum(v for k, v in kernels["choices"].items() if k != "dense")
    out.append(
        f"* RewriteKernelsPass chose a sparse kernel for {chosen} of {kernels['linears']} pruned Linears: "
        + ("CSR was slower than dense for every one on this CPU, so the pruned models run the same dense matmuls "
           "as the dense model (zeros included) in every runtime measured here."
           if chosen == 0 else f"see the {fifty}-kernels column.")
    )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", default=str(ROOT / "out" / "bench-models"), help="pruned folders and exported files")
    ap.add_argument("--model", default="smollm2-135m", help="the dense model (tiny-llama for a quick smoke run)")
    ap.add_argument("--method", default="sparsegpt", help="pruning method of the 50 %% and 2:4 models")
    ap.add_argument("--sliced", default=None, help=f"a 30 %%-sliced model folder (default <models-dir>/smollm2-{SLICED_SUFFIX} if present)")
    ap.add_argument("--runtimes", nargs="+", default=["eager", "torchscript", "onnxruntime"])
    ap.add_argument("--repeats", type=int, default=10, help="prefill and step repeats")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--throughput-repeats", type=int, default=3, help="throughput repeats (0 skips the case)")
    ap.add_argument("--kernel-tokens", type=int, default=128, help="tokens RewriteKernelsPass measures on")
    ap.add_argument("--load-note", default="", help="free text about the machine's load, written into the results")
    ap.add_argument("--results", default=str(RESULTS), help="where latency.md/.json/.png go")
    ap.add_argument("--reuse-files", action="store_true", help="reuse exported files whose checks passed in an earlier run")
    args = ap.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run = Run()
    load: dict[str, Any] = {"start": load_average()}
    models_dir = Path(args.models_dir)
    files_dir = models_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- models
    models: dict[str, torch.nn.Module] = {"dense": load_model(args.model).model}
    sources: dict[str, str] = {"dense": f"load_model({args.model!r})"}
    fifty, kernels_name = f"{args.method}-50", f"{args.method}-50-kernels"
    pruned = [f"{args.method}-{suffix}" for suffix in PATTERNS]
    for label, suffix in zip(pruned, PATTERNS):
        folder = pruned_folder(models_dir, args.model, args.method, suffix)
        models[label] = load_model(str(folder)).model
        sources[label] = f"run_prune -> {folder.name}"
    sliced = Path(args.sliced) if args.sliced else models_dir / f"{folder_stem(args.model)}-{SLICED_SUFFIX}"
    todo: list[str] = []
    if (sliced / "config.json").is_file():
        models["sliced-30"] = load_model(str(sliced)).model
        sources["sliced-30"] = str(sliced)
    else:
        todo.append(
            f"30 %-sliced model: no folder at {sliced} (the slicing pass, graphprune/passes/slice.py, was not "
            "available when these results were taken); rerun with --sliced DIR to add it."
        )

    say(f"RewriteKernelsPass on {fifty} at {args.kernel_tokens} tokens ...")
    kernel_stats, rewritten = kernel_choice(models[fifty], args.kernel_tokens)
    say(f"  choices {kernel_stats['choices']}")
    if rewritten is not None:
        models[kernels_name] = rewritten
        sources[kernels_name] = f"{fifty} after RewriteKernelsPass"

    # ---------------------------------------------------------------- files
    targets: dict[str, dict[str, Any]] = {}
    for name in list(models)[1:] + ["dense"]:  # dense last: its files may come from an earlier run (--reuse-files)
        model = models[name]
        targets[name] = {
            "source": sources[name],
            "parameters": sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()),
            **linear_sparsity(model),
            # ONNX lowers kernels to dense Linears: the kernels model's file would be the 50 % model's
            "files": export_files(
                name, model, files_dir, onnx=name != kernels_name, sparse=name in pruned, reuse=args.reuse_files,
                source=sources[name],
            ),
        }
    if kernels_name in targets:
        targets[kernels_name]["sparsity"] = targets[fifty]["sparsity"]
    targets = {name: targets[name] for name in models}  # back to the bench order, dense first

    # ---------------------------------------------------------------- report
    def write_report(results: dict[str, list[BenchResult]], load: dict[str, Any], pending: str = "") -> None:
        if pending:
            todo.append(f"{pending}; rerun the script for the complete table.")
        parts = [merge(results["short"])] + ([merge(results["throughput"])] if results["throughput"] else [])
        everything = merge(parts)
        machine = machine_info()
        results_dir = Path(args.results)
        provenance = run.stamp({})["provenance"]
        data = {
            "provenance": provenance,
            "started": started,
            "machine": machine,
            "load_average": load,
            "load_note": args.load_note,
            "repeats": {"prefill": args.repeats, "step-nocache": args.repeats, "throughput": args.throughput_repeats},
            "warmup": {"prefill": args.warmup, "step-nocache": args.warmup, "throughput": 1},
            "targets": targets,
            "kernels": kernel_stats,
            "todo": todo,
            "records": everything.to_dicts(),
        }
        atomic_write(results_dir / "latency.json", (json.dumps(data, indent=2) + "\n").encode())
        write_plot(everything, results_dir / "latency.png", title=f"{args.model}, speedup vs dense ({machine['cpu']}, {machine['usable_cores']} cores)")
        md = [
            f"# Latency: dense vs pruned {args.model} on CPU",
            "",
            f"Generated by `{provenance['command']}` at commit {provenance['commit']} ({started}). Machine: {machine['cpu']}, "
            f"{machine['usable_cores']} usable cores, torch {machine['torch']} ({machine['torch_threads']} threads, eager "
            f"and TorchScript), onnxruntime {machine['onnxruntime']} (CPUExecutionProvider, default threads), float32.",
            "",
            f"**Load:** the machine was shared with other jobs while this ran; load average (1, 5, 15 min) "
            f"{load['start']} at the start and {load['end']} at the end (per runtime: "
            + ", ".join(f"{k[6:]} {v}" for k, v in load.items() if k.startswith("after_"))
            + "). Interleaving and pairing make the ratios robust to load that hits all models alike, "
            "but the interquartile ranges are wider than on an idle machine. "
            + (args.load_note + " " if args.load_note else ""),
            "",
            *(
                [
                    f"**Pruning method:** the pruned models were made with `{args.method}`, not SparseGPT: on the shared "
                    "machine SparseGPT's 64x512 calibration would have taken about 1.5 h per model. Every runtime here runs "
                    "the pruned weights as dense matrices containing zeros, so their speed (and the sparse-initializer file "
                    "sizes, which depend on the number of nonzeros) is expected to be the same for any method reaching "
                    "the same sparsity and pattern; only the CSR timings of the kernel selection depend on where the "
                    "nonzeros are. Rerun with the default `--method sparsegpt` to confirm.",
                    "",
                ]
                if args.method != "sparsegpt"
                else []
            ),
            "## Speedup vs dense, side by side",
            "",
            f"Median of the paired per-repeat ratios (dense time / model time) [interquartile range]; > 1 is faster. "
            f"prefill and step-nocache: {args.repeats} repeats after {args.warmup} warm-up runs; throughput: "
            f"{args.throughput_repeats} repeats after 1. The step-nocache case runs one token without a KV cache "
            "(decoding with the cache is measured by benchmarks/decode.py).",
            "",
            summary_table(everything),
            "## Files",
            "",
            "Sizes on disk. ONNX parity: largest |Δlogits| of onnxruntime vs PyTorch on two probe batches (`export_onnx`); "
            "the sparse-initializer file is the plain file re-encoded (`sparsify_initializers`, as `graphprune export "
            "--sparse-initializers` does) and compared with it in onnxruntime. TorchScript parity: `torch.jit.load` in a "
            "fresh process vs PyTorch.",
            "",
            files_table(targets),
            "## Kernel selection",
            "",
            kernels_section(kernel_stats, fifty),
            "## Findings (derived from the numbers above by the script)",
            "",
            findings(everything, targets, kernel_stats, fifty),
            "",
        ]
        if todo:
            md += ["## Not included yet", ""] + [f"* TODO: {t}" for t in todo] + [""]
        md += ["## All records", ""] + [to_markdown(p) for p in parts]
        atomic_write(results_dir / "latency.md", "\n".join(md).encode())
        say(f"wrote {results_dir / 'latency.md'}, latency.json, latency.png")
        if pending:
            todo.pop()

    # ---------------------------------------------------------------- timing
    def bench_targets(runtime: str) -> list[BenchTarget]:
        out = []
        for name, model in models.items():
            f = targets[name]["files"]
            if runtime == "onnxruntime":
                if name == kernels_name:
                    continue  # same ONNX graph as the 50 % model
                out.append(BenchTarget(name, model=model, onnx=f["onnx"]["path"]))
                if "onnx_sparse" in f and name == fifty:
                    out.append(BenchTarget(f"{name}-sparse-init", model=model, onnx=f["onnx_sparse"]["path"]))
            elif runtime == "torchscript":
                out.append(BenchTarget(name, model=model, torchscript=f["torchscript"]["path"]))
            else:
                out.append(BenchTarget(name, model=model))
        return out

    # all runtimes' prefill and step first (a report is written after them), then throughput
    results: dict[str, list[BenchResult]] = {"short": [], "throughput": []}
    for runtime in args.runtimes:
        say(f"{runtime}: prefill + step, {args.repeats} repeats ...")
        results["short"].append(
            bench_latency(bench_targets(runtime), [runtime], SHORT_CASES, repeats=args.repeats, warmup=args.warmup, progress=False)
        )
        load[f"after_{runtime}"] = load_average()
    if args.throughput_repeats > 0:
        load["end"] = load_average()
        write_report(results, load, pending="throughput 8x512 (still running when this was written)")
        for runtime in args.runtimes:
            say(f"{runtime}: throughput 8x512, {args.throughput_repeats} repeats ...")
            results["throughput"].append(
                bench_latency(
                    bench_targets(runtime), [runtime], [THROUGHPUT], repeats=args.throughput_repeats, warmup=1, progress=False
                )
            )
            load[f"after_{runtime}_throughput"] = load_average()
    load["end"] = load_average()
    write_report(results, load)
    print(summary_table(merge(results["short"] + results["throughput"])))


if __name__ == "__main__":
    main()
