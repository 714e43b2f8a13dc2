"""Print the demo's summary table from the files scripts/demo.sh wrote.

    python scripts/demo_summary.py out/demo
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path


def main(out: Path) -> None:
    dense = json.loads((out / "dense-eval.json").read_text())
    report = json.loads((out / "sparsegpt-50" / "report.json").read_text())
    export = json.loads((out / "export.json").read_text())
    sample = json.loads((out / "generate.json").read_text())
    bench = json.loads((out / "bench" / "latency.json").read_text())
    pruned = bench["targets"][1]["name"]
    records = {(r["case"], r["runtime"], r["target"]): r for r in bench["records"]}
    mib = 2**20
    check = (
        f"{export['check_tokens']} greedy tokens equal"
        if export["tokens_equal"]
        else f"equal up to a tie at step {export['tie_divergences'][0]['step']}"
    )
    rows = [
        ("perplexity (protocol, all windows)", f"{dense['ppl']:.3f}", f"{report['ppl']:.3f}"),
        ("Linear weight sparsity", "0", f"{report['achieved_sparsity']:.4f}"),
        (
            "ONNX generation file (dense storage / sparse initializers)",
            "-",
            f"{export['dense_bytes'] / mib:.0f} MiB / {export['bytes'] / mib:.0f} MiB ({export['bytes'] / export['dense_bytes']:.2f}x)",
        ),
        ("ONNX file vs PyTorch", "-", f"{check}, max |dlogits| {export['max_abs_diff']:.1e}"),
    ]
    for (case, runtime, target), r in records.items():
        if target != pruned:
            continue
        base = records[(case, runtime, bench["baseline"])]
        if r.get("tokens_per_s"):
            label = f"{case} tokens/s, {runtime}"
            ratio = f"{r['speedup']:.2f}x [{r['speedup_q1']:.2f}, {r['speedup_q3']:.2f}]"
            rows.append((label, f"{base['tokens_per_s']:.1f}", f"{r['tokens_per_s']:.1f} ({ratio})"))
        else:
            label = f"{case} ms, {runtime}"
            ratio = f"{r['speedup']:.2f}x [{r['speedup_q1']:.2f}, {r['speedup_q3']:.2f}]"
            rows.append((label, f"{1e3 * base['median_s']:.0f}", f"{1e3 * r['median_s']:.0f} ({ratio})"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'dense':>10}  sparsegpt 50 %")
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>10}  {b}")
    m = bench["machine"]
    print(
        f"\nSpeed: median of {bench['repeats']} paired runs (speedup = dense time / pruned time [IQR]) on {m['cpu']} "
        f"({m['usable_cores']} cores, load average {m['load_average']['start']} at start); ttft-128 = a 128-token "
        "prompt to the first token, decode-b1 = 64 tokens after it with the KV cache. This job times these two cases "
        "with 3 repeats; benchmarks/decode.py runs the full protocol. Full table: " + str(out / "bench" / "latency.md")
    )
    text = sample["texts"][0].replace("\n", " ")
    print("\nThe pruned ONNX file continues " + repr(sample["prompts"][0]) + ":")
    print(textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="  "))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo"))
