"""Decode speed of pruned SmolLM2-135M on graphprune's native sparse kernels, against dense.

One interleaved run (docs/PROTOCOL.md, "Latency": 64 greedy tokens after a 128-token
prompt, batch 1, KV cache; the time of the 63 steps after the first token) over these
(model, runtime) pairs, every repeat running each pair once in an order rotated by the
repeat, so every ratio is paired:

* ``dense / onnxruntime``: the dense model's generation export (the fastest dense runtime
  so far);
* ``dense / compile``: the dense model's KV-cache step compiled by ``torch.compile``
  (inductor; graphprune's ``--runtime compile``);
* ``dense+kernels / compile+kernels``: the dense model on the kernels measured for it
  (``kernels_for(..., "measure")``: torch's dense matmul, the packed kernel and the
  streaming dense kernel timed on every Linear, LM head included, at 1, 8 and 128 tokens; a
  decode kernel and a prefill kernel per weight), compiled the same way: the fastest dense
  graphprune runtime;
* ``<pruned> / compile+kernels``: each pruned folder on its measured kernels, compiled.

Decode kernels are timed cold (cycling through copies twice the last-level cache), prefill
kernels hot, torch's dense matmul against the packed and the streaming kernel (10 timed runs;
torch's CSR, 0.5-0.8x of dense at decode in kernel_decode.md, is left out to save time).

Reported: tokens per second, the paired speedups against dense onnxruntime and against
dense compile, and, per pruned model, the logits of 16 greedy tokens of the compiled
kernel model against the same folder run dense in eager PyTorch
(``max |Δ| / max |logits|``), the kernel choices, and the bytes of weights one decode step
reads.

    python benchmarks/decode_kernels.py --use sparsegpt-50=out/kern/sparsegpt-50 \\
        --use sparsegpt-70=out/kern/sparsegpt-70 --use sparsegpt-2of4=out/kern/sparsegpt-2of4

The folders come from ``graphprune prune --method sparsegpt --sparsity 0.5`` (0.7, or
``--pattern 2:4``). Writes benchmarks/results/decode_kernels.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import Run  # noqa: E402

from graphprune.bench.latency import machine_info  # noqa: E402
from graphprune.exporters.generation import export_generation  # noqa: E402
from graphprune.exporters.runners import CompiledRunner, EagerRunner, generate, load_runner  # noqa: E402
from graphprune.fileio import write_json, write_text  # noqa: E402
from graphprune.kernels.packed import native_isa  # noqa: E402
from graphprune.kernels.regime import RegimeLinear, kernels_for, top_kernels  # noqa: E402
from graphprune.models import load_model  # noqa: E402
from graphprune.pipeline.export_bench import linear_sparsity  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPT, NEW = 128, 64
CHECK_TOKENS = 16
#: kernels measured besides torch's dense matmul (torch's CSR is 0.5-0.8x of dense at 50-70 %
#: and 1-8 tokens in kernel_decode.md, and several times slower at 128: left out to save time)
CANDIDATES = ("packed", "stream")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights the Linears (LM head included) read per decode step: each kernel's decode storage,
    each plain Linear's weight and bias (an embedding lookup reads one row, left out)."""
    total = 0
    for _, kernel in top_kernels(model):
        decode = kernel.decode if isinstance(kernel, RegimeLinear) else kernel
        total += sum(b.numel() * b.element_size() for b in decode.buffers())
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def decode_timer(runner: Any, ids: torch.Tensor) -> Callable[[], float]:
    return lambda: generate(runner, ids, max_new_tokens=NEW + 1, stop_at_eos=False).decode_s


def logits_check(folder: str, compiled: Any, ids: torch.Tensor) -> dict[str, Any]:
    """16 greedy tokens of the compiled kernel model vs the same folder dense in eager PyTorch."""
    reference = load_model(folder).model.eval()
    ref = generate(EagerRunner(reference), ids, max_new_tokens=CHECK_TOKENS, stop_at_eos=False, keep_logits=True)
    got = generate(compiled, ids, max_new_tokens=CHECK_TOKENS, stop_at_eos=False, keep_logits=True)
    same = bool(torch.equal(ref.tokens, got.tokens))
    rel = float((got.logits - ref.logits).abs().max() / ref.logits.abs().max())
    return {"same_tokens": same, "tokens": CHECK_TOKENS, "max_rel_diff": rel}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="the dense model (default the built-in one)")
    ap.add_argument("--use", action="append", default=[], metavar="NAME=FOLDER", help="a pruned folder (repeatable)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per pair (the first compiles)")
    ap.add_argument("--results", default=str(RESULTS), help="folder for decode_kernels.md/.json")
    ap.add_argument("--note", default="", help="a sentence on the run's conditions for the report")
    ap.add_argument("--render", action="store_true", help="only rewrite decode_kernels.md from decode_kernels.json")
    args = ap.parse_args()
    if args.render:
        out = Path(args.results)
        write_text(out / "decode_kernels.md", markdown(json.loads((out / "decode_kernels.json").read_text())))
        return
    if not args.use:
        ap.error("give at least one --use NAME=FOLDER")
    pruned = dict(item.split("=", 1) for item in args.use)
    run = Run()
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp(prefix="graphprune-decode-kernels-"))

    pairs: dict[str, Callable[[], float]] = {}
    models: dict[str, dict[str, Any]] = {}
    say(f"loading {args.model} ...")
    dense = load_model(args.model).model.eval()
    vocab = int(dense.config.vocab_size)
    ids = ids.clamp_(max=vocab - 1)
    models["dense"] = {"source": args.model, "step_bytes": step_bytes(dense), **linear_sparsity(dense)}
    say("dense: exporting to ONNX for generation ...")
    folder = export_generation(dense, tmp / "dense-onnx", format="onnx", check_tokens=8).path.parent
    pairs["dense / onnxruntime"] = decode_timer(load_runner(folder, spinning=False), ids)
    pairs["dense / compile"] = decode_timer(CompiledRunner(dense), ids)
    compiled: dict[str, Any] = {}
    sources = {"dense": args.model, **pruned}
    for name, path in sources.items():
        if name == "dense":  # the same dense model on its own measured kernels (a dense weight may decode faster too)
            lm = load_model(path).model.eval()
            models["dense+kernels"] = {"source": path, **linear_sparsity(lm)}
            name = "dense+kernels"
        else:
            lm = load_model(path).model.eval()
            models[name] = {"source": path, **linear_sparsity(lm)}
        say(f"{name}: measuring kernels for {sum(1 for m in lm.modules() if isinstance(m, torch.nn.Linear))} Linears ...")
        t0 = time.perf_counter()
        kernels = kernels_for(lm, None, "measure", progress=False, candidates=CANDIDATES, repeats=10, warmup=2)
        models[name]["kernel_seconds"] = round(time.perf_counter() - t0, 1)
        models[name]["kernels"] = {k: v for k, v in kernels.items() if k != "report"}
        report = kernels["report"]
        models[name]["linear_seconds"] = {
            t: {
                "dense": sum(e["times"][t]["dense"] for e in report.values()),
                "chosen": sum(e["times"][t][e["decode" if int(t) <= e["max_decode_tokens"] else "prefill"]] for e in report.values()),
            }
            for t in ("1", "8", "128")
        }
        models[name]["step_bytes"] = step_bytes(lm)
        say(f"{name}: kernels {models[name]['kernels']['choices']}")
        compiled[name] = CompiledRunner(lm)
        pairs[f"{name} / compile+kernels"] = decode_timer(compiled[name], ids)

    names = list(pairs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, name in enumerate(names):
        say(f"warm-up {i + 1}/{len(names)}: {name} (compiles on the first run) ...")
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            pairs[name]()
        say(f"  {time.perf_counter() - t0:.0f} s")
    load_start = os.getloadavg()
    say(f"timing {args.repeats} interleaved repeats, load {load_start}")
    for r in range(args.repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(pairs[name]())
        say(f"  repeat {r + 1}: " + ", ".join(f"{n} {NEW - 1} / {times[n][-1]:.2f}s" for n in names))
    load_end = os.getloadavg()
    for name in compiled:
        say(f"{name}: logits check ...")
        models[name]["logits_check"] = logits_check(models[name]["source"], compiled[name], ids)

    rows = []
    for name in names:
        q1, med, q3 = quartiles(times[name])
        row: dict[str, Any] = {"pair": name, "median_s": med, "q1_s": q1, "q3_s": q3, "tokens_per_s": (NEW - 1) / med, "times_s": times[name]}
        for base in ("dense / onnxruntime", "dense / compile"):
            r1, rm, r3 = quartiles([b / t for b, t in zip(times[base], times[name], strict=True)])
            row[f"vs {base}"] = [r1, rm, r3]
        rows.append(row)
    data = run.stamp({
        "case": f"decode-b1 1x{PROMPT}+{NEW}",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
        "models": models,
        "machine": machine_info(),
        "native_isa": native_isa(),
        "load_average": {"start": list(load_start), "end": list(load_end)},
        "note": args.note,
    })
    out = Path(args.results)
    write_json(out / "decode_kernels.json", data)
    write_text(out / "decode_kernels.md", markdown(data))
    say(f"wrote {out / 'decode_kernels.md'}")


def fmt(r: list[float]) -> str:
    return f"{r[1]:.2f}x [{r[0]:.2f}, {r[2]:.2f}]"


def markdown(data: dict[str, Any]) -> str:
    prov = data["provenance"]
    machine = data["machine"]
    lines = [
        "# Decode on graphprune's native sparse kernels (torch.compile) vs dense (onnxruntime, torch.compile)",
        "",
        f"Generated by `{prov['command']}` at commit {prov['commit']} ({prov['date']}). Machine: {machine.get('cpu')}, "
        f"{machine.get('torch_threads')} torch threads, torch {machine.get('torch')}, onnxruntime {machine.get('onnxruntime')}; packed kernel "
        f"vector path: {data['native_isa']}. Load average (1, 5, 15 min) {data['load_average']['start']} at the start of the "
        f"timing, {data['load_average']['end']} at its end. {data['note']}",
        "",
        f"Case {data['case']}: 64 greedy tokens after a 128-token prompt, batch 1, KV cache; time of the 63 cached steps "
        f"after the first token. Median of {data['repeats']} interleaved repeats after {data['warmup']} warm-up runs "
        "(the first compiles); speedups are medians of the per-repeat paired ratios [interquartile range].",
        "",
        "| model / runtime | tokens/s | vs dense onnxruntime | vs dense torch.compile |",
        "|---|---:|---:|---:|",
    ]
    for row in data["rows"]:
        lines.append(f"| {row['pair']} | {row['tokens_per_s']:.1f} | {fmt(row['vs dense / onnxruntime'])} | {fmt(row['vs dense / compile'])} |")
    lines += [
        "",
        "## Models",
        "",
        "Weight bytes per decode step: the weights the Linears read, LM head included, each kernel's decode storage "
        "instead of its dense weight (the LM head keeps dense weights on any kernel). Linear time: the sum over the "
        "measured Linears (LM head included) of the "
        "per-Linear median times measured while choosing, dense vs the chosen kernel. Logits: 16 greedy tokens of the "
        "compiled kernel model against the same folder run dense in eager PyTorch.",
        "",
        "| model | sparsity | weight MB per step | kernels (decode+prefill: count) | Linear time 1 / 8 / 128 tokens, dense -> chosen (ms) | logits check |",
        "|---|---:|---:|---|---|---|",
    ]
    for name, m in data["models"].items():
        if name == "dense":
            lines.append(f"| dense | {m['sparsity']:.3f} | {m['step_bytes'] / 1e6:.0f} | | | |")
            continue
        ls = m["linear_seconds"]
        secs = " / ".join(f"{ls[t]['dense'] * 1e3:.1f} -> {ls[t]['chosen'] * 1e3:.1f}" for t in ("1", "8", "128"))
        chk = m["logits_check"]
        check = f"{'same' if chk['same_tokens'] else 'different'} {chk['tokens']} tokens, max rel diff {chk['max_rel_diff']:.1e}"
        lines.append(
            f"| {name} | {m['sparsity']:.3f} | {m['step_bytes'] / 1e6:.0f} | {m['kernels']['choices']} | {secs} | {check} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
