"""Scripted pipelines behind ``graphprune export`` and ``graphprune bench``.

Example::

    from graphprune.pipeline import BenchJob, ExportJob, run_bench, run_export

    rep = run_export(ExportJob("out/sgpt50", "onnx", "out/sgpt50.onnx", sparse_initializers=True))
    print(rep["bytes"], rep["dense_bytes"], rep["max_abs_diff"])
    res = run_bench(BenchJob(["smollm2-135m", "out/sgpt50"], out="out/bench"))
    print(res["summary"])

``run_export`` loads a model (folder, built-in name or GGUF file), exports it and
proves the file matches PyTorch (ONNX in onnxruntime, TorchScript in a fresh Python
process). ``run_bench`` times several models side by side with
:func:`graphprune.bench.bench_latency` and writes ``latency.md`` (speedups against the
first model, median and interquartile range), ``latency.json`` (every time, the
machine, the load average) and ``latency.png``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, cast

from torch import nn

from graphprune.bench import BenchResult, BenchTarget, bench_latency, to_markdown
from graphprune.bench.report import write_plot
from graphprune.errors import ConfigError, ExportError
from graphprune.fileio import publish, staging_dir, write_text
from graphprune.kernels import KernelLinear
from graphprune.kernels.regime import kernels_for
from graphprune.models import LoadedModel, load_model
from graphprune.pipeline.jobs import BenchJob, ExportJob

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- export
def linear_sparsity(model: nn.Module) -> dict[str, float | int]:
    """Fraction of zeros over the weights of the ``nn.Linear`` modules (LM head excluded).

    Counted from the weights themselves (the protocol's accounting), so it works for any
    folder, pruned by graphprune or not.
    """
    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    zeros = total = 0
    for module in model.modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear):
            w = module.weight
        elif isinstance(module, KernelLinear):  # a Linear rewritten by RewriteKernelsPass
            w = module.dense_weight()
        else:
            continue
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"sparsity": zeros / total if total else 0.0, "linear_weights": total}


def run_export(job: ExportJob) -> dict[str, Any]:
    """Load, export, check parity; return the export report as a dict (plus model facts)."""
    from graphprune.exporters import export_onnx, export_torchscript

    job.validate()
    t0 = time.perf_counter()
    loaded = load_model(job.model, trust_remote_code=job.trust_remote_code)
    if job.purpose == "generation":
        return _export_generation(job, loaded, t0)
    tokenizer_files = _staged_tokenizer(loaded, Path(job.out).parent)
    if job.format == "onnx":
        report = export_onnx(
            loaded.model, job.out, sparse_initializers=job.sparse_initializers, atol=job.atol, quantize=job.quantize
        )
    else:
        report = export_torchscript(loaded.model, job.out, atol=job.atol)
    res = report.to_dict()
    res["tokenizer"] = _place_tokenizer(tokenizer_files, Path(job.out).parent)
    res.update(
        {
            "model": loaded.name,
            "source": job.model,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            **linear_sparsity(loaded.model),
            "checked_in": "onnxruntime (CPUExecutionProvider)" if job.format == "onnx" else "torch.jit.load in a fresh process",
            "total_seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return res


def _staged_tokenizer(loaded: LoadedModel, folder: Path) -> dict[str, bytes]:
    """The tokenizer's files, to be written next to a logits export; fails (before any export
    work) when ``folder`` already holds a different tokenizer."""
    import tempfile

    if loaded.tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="graphprune-tok-") as tmp:
        loaded.tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    clash = [n for n, data in files.items() if (folder / n).is_file() and (folder / n).read_bytes() != data]
    if clash:
        raise ExportError(
            f"{folder} already holds another tokenizer ({', '.join(sorted(clash))} differ from {loaded.name}'s); "
            "export into a folder of its own so the file and its tokenizer stay together."
        )
    return files


def _place_tokenizer(files: dict[str, bytes], folder: Path) -> list[str]:
    """Write the tokenizer files missing from ``folder`` (identical ones stay as they are)."""
    staged = []
    with staging_dir(folder / "tokenizer.json") as stage:
        for name, data in files.items():
            if not (folder / name).is_file():
                (stage / name).write_bytes(data)
                staged.append(stage / name)
        publish(staged, folder)
    return sorted(files)


def _export_generation(job: ExportJob, loaded: LoadedModel, t0: float) -> dict[str, Any]:
    from graphprune.exporters.generation import export_generation

    report = export_generation(
        loaded.model, job.out, format=cast(Any, job.format), tokenizer=loaded.tokenizer,
        check_tokens=job.check_tokens, atol=job.atol, overwrite=job.overwrite,
        quantize=job.quantize, sparse_initializers=job.sparse_initializers,
    )
    res = report.to_dict()
    res.update(
        {
            "model": loaded.name,
            "source": job.model,
            "purpose": "generation",
            "folder": job.out,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            **linear_sparsity(loaded.model),
            "checked_in": "onnxruntime (CPUExecutionProvider)" if job.format == "onnx" else "torch.jit.load",
            "total_seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return res


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def export_line(res: dict[str, Any]) -> str:
    """One human line for an export result."""
    if res.get("purpose") == "generation":
        check = "no decoding check"
        if res["check_tokens"]:
            agree = "the same tokens" if res["tokens_equal"] else f"the same tokens up to a tie at step {res['tie_divergences'][0]['step']}"
            check = f"{res['check_tokens']} greedy tokens from 2 prompts in {res['checked_in']}: {agree}, max |dlogits| {res['max_abs_diff']:.2g}"
            if res.get("quantize"):
                check += (
                    f"; its int8 copy: prefill logits within a relative {res['relative_error']:.3f} of the float32 file, "
                    f"eager's tokens for {res['int8_equal_tokens']} of {res['check_tokens']} steps"
                )
        size = mib(res["bytes"])
        if res.get("quantize"):
            size = f"int8 {size}, float32 {mib(res['float32_bytes'])}"
        if res.get("sparse_initializers"):
            size += f", {res['sparse_initializers']} sparse-encoded tensors"
        return (
            f"{res['model']}: wrote {res['folder']} (generation, {res['format']} with KV cache: {size}, "
            f"{len(res['layout']['keys'])} layers); weight sparsity {res['sparsity']:.3f}; {check}; {res['total_seconds']:.1f}s"
        )
    size = mib(res["bytes"])
    if res.get("dense_bytes"):
        size = (
            f"dense {mib(res['dense_bytes'])} -> sparse initializers {size}, "
            f"{res['bytes'] / res['dense_bytes']:.2f}x, {res['packed_initializers']} bitmask + "
            f"{res['sparse_initializers']} COO tensors"
        )
    shapes = ", ".join(f"{b}x{s}" for b, s in res["probe_shapes"])
    if res.get("quantize"):
        return (
            f"{res['model']}: wrote {res['path']} (onnx int8: {size}; float32 {mib(res['float32_bytes'])}); weight sparsity "
            f"{res['sparsity']:.3f}; float32 file max |dlogits| {res['float_max_abs_diff']:.2g} vs PyTorch, int8 file within a "
            f"relative {res['relative_error']:.3f} of it (same top-1 token at {res['top1_agreement']:.1%} of positions) "
            f"in {res['checked_in']} on [{shapes}]; {res['total_seconds']:.1f}s"
        )
    return (
        f"{res['model']}: wrote {res['path']} ({res['format']}: {size}); weight sparsity {res['sparsity']:.3f}; "
        f"max |dlogits| {res['max_abs_diff']:.2g} vs PyTorch in {res['checked_in']} on [{shapes}]; "
        f"{res['total_seconds']:.1f}s"
    )


# ---------------------------------------------------------------------------- bench
def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def summary_table(result: BenchResult) -> str:
    """Speedups side by side: one row per (case, runtime), one column per target."""
    targets: list[str] = []
    rows: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, str], str] = {}
    shapes: dict[str, str] = {}
    for r in result.records:
        if r.target not in targets:
            targets.append(r.target)
        if (r.case, r.runtime) not in rows:
            rows.append((r.case, r.runtime))
        shapes[r.case] = r.shape
        cell = "1.00x" if r.target == result.baseline else f"{r.speedup:.2f}x [{r.speedup_q1:.2f}, {r.speedup_q3:.2f}]"
        if r.tokens_per_s is not None:
            cell += f" ({r.tokens_per_s:.1f} tok/s)"
        cells[(r.case, r.runtime, r.target)] = cell
    header = ["case", "runtime"] + [f"{t} (baseline)" if t == result.baseline else t for t in targets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case, runtime in rows:
        row = [f"{case} {shapes[case]}", runtime] + [cells.get((case, runtime, t), "-") for t in targets]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def bench_markdown(result: BenchResult, targets: list[dict[str, Any]], load: dict[str, Any]) -> str:
    """The report: targets, side-by-side speedups, then every record with the machine line."""
    lines = ["# Latency", "", "| target | source | weight sparsity | parameters |", "|---|---|---:|---:|"]
    for t in targets:
        lines.append(f"| {t['name']} | `{t['source']}` | {t['sparsity']:.3f} | {t['parameters']:,} |")
    lines += [
        "",
        f"Speedup = {result.baseline} time / target time, paired per interleaved repeat: median "
        "[interquartile range]; > 1 is faster than the baseline.",
        "",
        summary_table(result),
        f"Load average (1, 5, 15 min) at start {load.get('start')}, at end {load.get('end')} "
        f"on {result.machine.get('usable_cores')} usable cores.",
        "",
        "## All records",
        "",
        to_markdown(result),
    ]
    return "\n".join(lines)


def _given_generation(job: BenchJob, label: str) -> dict[str, str | Path]:
    """``--generation LABEL=DIR``: the folder serves the runtime of its format."""
    from graphprune.exporters.kv import read_description

    folder = job.generation.get(label)
    if folder is None:
        return {}
    runtime = "onnxruntime" if read_description(folder)["format"] == "onnx" else "torchscript"
    return {runtime: folder}


def _kernel_line(target: dict[str, Any]) -> dict[str, Any]:
    kernels = target.get("kernels")
    return {} if kernels is None else {"kernels": {k: v for k, v in kernels.items() if k != "report"}}


def run_bench(job: BenchJob, progress: bool = True) -> dict[str, Any]:
    """Load every target, time them side by side, write the report files; return the summary."""
    cases = job.validate()
    labels = job.labels()
    loaded: list[LoadedModel] = []
    info: list[dict[str, Any]] = []
    for label, spec in zip(labels, job.targets, strict=True):
        lm = load_model(spec, trust_remote_code=job.trust_remote_code)
        loaded.append(lm)
        info.append(
            {"name": label, "source": spec, "parameters": sum(p.numel() for p in lm.model.parameters()), **linear_sparsity(lm.model)}
        )
        if set(job.runtimes) != {"onnxruntime"}:  # onnxruntime runs ONNX files, which hold dense weights
            kernels = kernels_for(lm.model, spec, job.kernels, progress=progress)
            info[-1]["kernels"] = kernels
            log.info("%s: kernels %s (%s)", label, kernels["choices"] or "all dense", kernels["source"])
    vocab = {getattr(lm.config, "vocab_size", None) for lm in loaded}
    if len(vocab) != 1:
        raise ConfigError(f"the models have different vocabularies {sorted(map(str, vocab))}; compare models of one family.")
    load = {"start": load_average()}
    t0 = time.perf_counter()
    result = bench_latency(
        [BenchTarget(label, model=lm.model, generation=_given_generation(job, label)) for label, lm in zip(labels, loaded, strict=True)],
        runtimes=list(job.runtimes),
        cases=cases,
        repeats=job.repeats,
        warmup=job.warmup,
        threads=job.threads,
        seed=job.seed,
        progress=progress,
    )
    load["end"] = load_average()
    result.machine["load_average"] = load
    summary = {
        "baseline": result.baseline,
        "targets": [{k: v for k, v in t.items() if k != "kernels"} | _kernel_line(t) for t in info],
        "seconds": round(time.perf_counter() - t0, 2),
        "table": summary_table(result),
        "files": {},
        **job.extra,
    }
    if job.out is not None:
        out = Path(job.out)
        data = result.to_dict() | {"targets": info}
        with staging_dir(out / "latency.md") as stage:  # the three files land together or not at all
            write_text(stage / "latency.md", bench_markdown(result, info, load))
            write_text(stage / "latency.json", json.dumps(data, indent=2) + "\n")
            write_plot(result, stage / "latency.png", title=f"speedup vs {result.baseline} ({result.machine.get('cpu')})")
            md, js, png = publish([stage / "latency.md", stage / "latency.json", stage / "latency.png"], out)
        summary["files"] = {"markdown": str(md), "json": str(js), "plot": str(png)}
    summary["result"] = result
    return summary


__all__ = [
    "bench_markdown",
    "export_line",
    "linear_sparsity",
    "load_average",
    "mib",
    "run_bench",
    "run_export",
    "summary_table",
]
