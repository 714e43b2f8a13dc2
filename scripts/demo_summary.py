"""Print the demo's summary table from the files scripts/demo.sh wrote.

    python scripts/demo_summary.py out/demo
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    dense = json.loads((out / "dense-eval.json").read_text())
    report = json.loads((out / "sparsegpt-50" / "report.json").read_text())
    export = json.loads((out / "export.json").read_text())
    bench = json.loads((out / "bench" / "latency.json").read_text())
    pruned = bench["targets"][1]["name"]
    speed = {
        (r["case"], r["runtime"]): f"{r['speedup']:.2f}x [{r['speedup_q1']:.2f}, {r['speedup_q3']:.2f}]"
        for r in bench["records"]
        if r["target"] == pruned
    }
    mib = 2**20
    rows = [
        ("perplexity (protocol)", f"{dense['ppl']:.3f}", f"{report['ppl']:.3f}"),
        ("Linear weight sparsity", "0", f"{report['achieved_sparsity']:.4f}"),
        (
            "ONNX file (dense storage / sparse initializers)",
            f"{export['dense_bytes'] / mib:.0f} MiB",
            f"{export['bytes'] / mib:.0f} MiB ({export['bytes'] / export['dense_bytes']:.2f}x)",
        ),
        ("ONNX vs PyTorch max |dlogits|", "-", f"{export['max_abs_diff']:.1e}"),
    ]
    rows += [(f"{case} speedup, {runtime}", "1.00x", value) for (case, runtime), value in speed.items()]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'dense':>10}  sparsegpt 50 %")
    for name, a, b in rows:
        print(f"{name:{width}}  {a:>10}  {b}")
    m = bench["machine"]
    print(
        f"\nSpeedups: dense time / pruned time, median [IQR] of {bench['repeats']} paired runs on {m['cpu']} "
        f"({m['usable_cores']} cores, load average {m['load_average']['start']} at start). "
        "Full table: " + str(out / "bench" / "latency.md")
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo"))
