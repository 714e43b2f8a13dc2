"""What ships, measured: perplexity through the exported files, and the last-position LM head.

1. Perplexity per docs/PROTOCOL.md of each model in PyTorch (eager) and through its exported
   logits file in onnxruntime and TorchScript (``graphprune eval --model FILE``), with the
   relative difference to PyTorch.
2. Prefill 1x128 in onnxruntime: the logits export (``input_ids -> logits`` of every
   position) against the generation export (KV cache, logits of the last position only) of
   the same dense model, interleaved and paired (``bench_latency`` with one custom runner pair).

Files: the exports ``benchmarks/latency.py`` and ``benchmarks/decode.py`` wrote (``--files``,
default ``out/bench-models/files``): ``<name>.onnx`` / ``<name>.pt`` and
``<name>-generation-onnx-<key>/``.

    python benchmarks/shipped.py --names dense sparsegpt-50 --source sparsegpt-50=DIR   # about 8 minutes on 2 cores

Writes benchmarks/results/shipped.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import Run  # noqa: E402

from graphprune.bench import machine_info  # noqa: E402
from graphprune.exporters.common import ort_session  # noqa: E402
from graphprune.exporters.runners import left_padded, load_runner  # noqa: E402
from graphprune.fileio import write_json, write_text  # noqa: E402
from graphprune.pipeline import EvalJob, run_eval  # noqa: E402
from graphprune.pipeline.export_bench import load_average  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prefill_pair(logits_file: Path, generation: Path, repeats: int, seq: int = 128) -> dict[str, Any]:
    """Paired prefill times: all-positions logits file vs last-position generation file (onnxruntime)."""
    full = ort_session(logits_file, spinning=False)
    runner = load_runner(generation, spinning=False)
    ids = torch.randint(0, runner.layout.vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    _, mask = left_padded([ids[0].tolist()])
    pos = torch.arange(seq)[None]
    past = runner.layout.empty_past(1)

    def run_full() -> float:
        t = time.perf_counter()
        full.run(["logits"], {"input_ids": ids.numpy()})
        return time.perf_counter() - t

    def run_last() -> float:
        t = time.perf_counter()
        runner.step(ids, mask, pos, past)
        return time.perf_counter() - t

    for _ in range(2):
        run_full(), run_last()
    pairs = []
    for r in range(repeats):
        if r % 2:
            b = run_last()
            a = run_full()
        else:
            a = run_full()
            b = run_last()
        pairs.append((a, b))
    ratios = [a / b for a, b in pairs]
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {
        "repeats": repeats,
        "all_positions_median_s": statistics.median(a for a, _ in pairs),
        "last_position_median_s": statistics.median(b for _, b in pairs),
        "speedup": med,
        "speedup_q1": q1,
        "speedup_q3": q3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", default=str(ROOT / "out" / "bench-models" / "files"))
    ap.add_argument("--names", nargs="+", default=["dense", "sparsegpt-50"])
    ap.add_argument("--tokenizer", default="smollm2-135m")
    ap.add_argument("--source", nargs="*", default=[], metavar="NAME=MODEL", help="the PyTorch model of NAME (default: dense -> smollm2-135m)")
    ap.add_argument("--prefill-repeats", type=int, default=20)
    ap.add_argument("--torchscript", action="store_true", help="also evaluate the .pt files (one more eval per model)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    run = Run()
    files = Path(args.files)
    sources = {"dense": "smollm2-135m", **dict(s.split("=", 1) for s in args.source)}
    rows: list[dict[str, Any]] = []
    load: dict[str, Any] = {"start": load_average()}
    for name in args.names:
        row: dict[str, Any] = {"model": name}
        if name in sources:
            say(f"{name}: perplexity in PyTorch ({sources[name]}) ...")
            row["pytorch"] = run_eval(EvalJob(model=sources[name]), progress=False)["ppl"]
        for runtime, suffix in (("onnxruntime", ".onnx"), ("torchscript", ".pt"))[: 2 if args.torchscript else 1]:
            path = files / f"{name}{suffix}"
            if path.is_file():
                say(f"{name}: perplexity through {path.name} ({runtime}) ...")
                row[runtime] = run_eval(EvalJob(model=str(path), tokenizer=args.tokenizer), progress=False)["ppl"]
                if "pytorch" in row:
                    row[f"{runtime}_rel_diff"] = row[runtime] / row["pytorch"] - 1
        rows.append(row)
    prefill: dict[str, Any] = {}
    generation = sorted(files.glob("dense-generation-onnx-*"))
    if (files / "dense.onnx").is_file() and generation:
        say(f"prefill 1x128 in onnxruntime: dense.onnx (all positions) vs {generation[-1].name} (last position) ...")
        prefill = prefill_pair(files / "dense.onnx", generation[-1], args.prefill_repeats)
    load["end"] = load_average()
    prov = run.stamp({})["provenance"]
    machine = machine_info()
    write_json(Path(args.results) / "shipped.json", {"provenance": prov, "machine": machine, "perplexity": rows, "prefill_last_position": prefill})
    lines = [
        "# What ships: perplexity through the exported files, and the last-position LM head",
        "",
        f"Generated by `{prov['command']}` at commit {prov['commit']} ({prov['date']}); {machine['cpu']}, "
        f"{machine['usable_cores']} cores, torch {machine['torch']}, onnxruntime {machine['onnxruntime']}; load average "
        f"{load['start']} at the start, {load['end']} at the end.",
        "",
        "## Perplexity per the protocol, through each runtime",
        "",
        "| model | PyTorch | onnxruntime (.onnx) | rel. diff | TorchScript (.pt) | rel. diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(row: dict[str, Any], key: str, pct: bool = False) -> str:
        if key not in row:
            return "-"
        return f"{row[key] * 100:+.4f} %" if pct else f"{row[key]:.4f}"

    for row in rows:
        lines.append(
            f"| {row['model']} | {fmt(row, 'pytorch')} | {fmt(row, 'onnxruntime')} | {fmt(row, 'onnxruntime_rel_diff', True)} | "
            f"{fmt(row, 'torchscript')} | {fmt(row, 'torchscript_rel_diff', True)} |"
        )
    if prefill:
        lines += [
            "",
            "## Prefill 1x128 in onnxruntime: LM head on the last position vs on every position",
            "",
            f"Dense model; paired over {prefill['repeats']} alternating repeats (spin-waiting off): the logits export "
            f"(every position) took {prefill['all_positions_median_s'] * 1e3:.1f} ms (median), the generation export "
            f"(empty cache, last position) {prefill['last_position_median_s'] * 1e3:.1f} ms: "
            f"**{prefill['speedup']:.2f}x** [{prefill['speedup_q1']:.2f}, {prefill['speedup_q3']:.2f}] faster.",
        ]
    write_text(Path(args.results) / "shipped.md", "\n".join(lines) + "\n")
    say(f"wrote {Path(args.results) / 'shipped.md'}")


if __name__ == "__main__":
    main()
