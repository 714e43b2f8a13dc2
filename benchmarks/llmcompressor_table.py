"""Side-by-side table of graphprune and llm-compressor on the default model.

Inputs are the JSON outputs of the two tools' runs of the same job, taken one after the
other on the same machine:

* llm-compressor: the last stdout line of ``benchmarks/llmcompressor_compare.py`` (its own venv);
* graphprune: the ``--json`` report of ``graphprune prune ... --eval`` (or ``report.json``).

    python benchmarks/llmcompressor_table.py --pair sparsegpt out/lc_sparsegpt.json out/sg.json \\
        --pair wanda out/lc_wanda.json out/w.json [--note "load ..."]

writes ``results/llmcompressor.json`` and ``results/llmcompressor.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def last_json(path: Path) -> dict[str, Any]:
    """The last JSON object in a file (llm-compressor logs to stdout before it)."""
    text = path.read_text()
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    start = text.find("{\n")
    return json.loads(text[start:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", nargs=3, action="append", metavar=("METHOD", "LLMCOMPRESSOR_JSON", "GRAPHPRUNE_JSON"), required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    rows: dict[str, Any] = {}
    for method, lc_path, gp_path in args.pair:
        lc, gp = last_json(Path(lc_path)), last_json(Path(gp_path))
        ours_s = float(gp["capture_seconds"]) + float(gp["prune_seconds"])
        rows[method] = {
            "llmcompressor": {k: lc[k] for k in ("ppl", "achieved_sparsity", "prune_seconds", "peak_rss_mb")},
            "graphprune": {"ppl": gp.get("ppl"), "achieved_sparsity": gp["achieved_sparsity"], "prune_seconds": round(ours_s, 1),
                           "peak_rss_mb": gp["peak_rss_mb"]},
            "time_ratio": round(float(lc["prune_seconds"]) / ours_s, 2),
            "ppl_rel_diff": (gp["ppl"] - lc["ppl"]) / lc["ppl"] if gp.get("ppl") else None,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llmcompressor.json").write_text(json.dumps({"note": args.note, "rows": rows}, indent=2) + "\n")
    lines = [
        "# graphprune vs llm-compressor on SmolLM2-135M",
        "",
        "Same model (float32), same 64x512 calibration segments and evaluation windows (docs/PROTOCOL.md; both read through",
        "graphprune's protocol code), 50 % unstructured, LM head dense in both, each tool with its defaults.",
        "llm-compressor: `oneshot()` with `SparseGPTModifier` / `WandaPruningModifier` (`benchmarks/llmcompressor_compare.py`, its own venv).",
        "graphprune: `graphprune prune --method M --sparsity 0.5`. Prune seconds: llm-compressor's whole `oneshot()` call;",
        "graphprune's capture + stage-wise calibration and pruning (model loading excluded from both).",
        "",
        args.note,
        "",
        "| method | tool | perplexity | achieved sparsity | prune s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method, r in rows.items():
        for tool in ("llmcompressor", "graphprune"):
            t = r[tool]
            ppl = f"{t['ppl']:.3f}" if t.get("ppl") else "-"
            lines.append(f"| {method} | {tool} | {ppl} | {t['achieved_sparsity']:.4f} | {t['prune_seconds']:.1f} | {t['peak_rss_mb']:.0f} |")
    lines.append("")
    for method, r in rows.items():
        diff = f"{100 * r['ppl_rel_diff']:+.2f} %" if r["ppl_rel_diff"] is not None else "n/a"
        lines.append(f"* {method}: graphprune perplexity {diff} relative to llm-compressor; llm-compressor took {r['time_ratio']:.2f}x graphprune's prune time.")
    (RESULTS / "llmcompressor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
