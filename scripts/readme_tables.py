"""Generate the README's result tables from the committed results files (no hand-typed figures).

Each table sits in README.md between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``;
this script rewrites what is between the markers from ``benchmarks/results/*.json``:

* ``prune_quality``: perplexity per method and pattern (``prune_quality.json``, ``dense.json``),
  with the commits the rows were measured at;
* ``llmcompressor``: the interleaved whole-process side-by-side with llm-compressor (``llmcompressor.json``);
* ``calib_dtype``: bfloat16 against float32 calibration forwards, one interleaved run (``calib_dtype.json``);
* ``rotations``: rotations x solvers (``rotations.json``);
* ``generalization``: every configuration measured on both texts, its perplexity on each
  relative to the dense model's (``prune_quality.json``, ``rotations.json``, ``dense.json``);
* ``latency``: paired speed-ups per case and runtime (``latency.json``);
* ``decode``: time to first token and cached decode, speed-ups and tokens per second (``decode.json``);
* ``decode_kernels``: cached decode on graphprune's kernels in ``torch.compile`` against dense
  (``decode_kernels.json``);
* ``shipped``: perplexity through the exported files, last-position prefill (``shipped.json``);
* ``structured``: structured pruning (MLP channels) against slicing, perplexity and speed-ups
  (``structured.json``);
* ``structured_layers``: the structured solvers on the same statistics, per down projection
  (``structured_layers.json``);
* ``zoo``: architecture family x capability, with the reason for every gap (``zoo_matrix.json``);
* ``deploy``: int8 on top of pruning and the peers' generation files (``deploy.json``, whose
  tables ``benchmarks/deploy.py`` renders from its own records).

    python scripts/readme_tables.py           # rewrite README.md
    python scripts/readme_tables.py --check   # exit 1 if README.md is not what the results give
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

METHODS = {"alps": "ALPS", "proximal": "proximal", "sparsegpt": "SparseGPT", "gblm": "GBLM", "wanda": "Wanda", "magnitude": "magnitude"}
PATTERNS = ("50%", "60%", "70%", "80%", "2:4")


def _load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _short_commit(row: dict[str, Any]) -> str:
    commit = str((row.get("provenance") or {}).get("commit", "?"))
    return commit.split(" ")[0]


def _news(row: dict[str, Any] | None) -> str:
    """The second text's perplexity of a results row; '-' for rows measured before it joined the protocol."""
    return f"{row['ppl_news']:.3f}" if row and "ppl_news" in row else "-"


def prune_quality() -> str:
    rows = _load("prune_quality.json")
    dense = _load("dense.json")
    best = {p: min((r["ppl"] for n, r in rows.items() if n.split(" ")[1:] == [p]), default=None) for p in PATTERNS}
    head = "| method | " + " | ".join(p.replace("%", " %") for p in PATTERNS) + " | prune s (2:4) |"
    lines = [head, "|---|" + "---:|" * (len(PATTERNS) + 1)]
    for key, label in METHODS.items():
        cells = []
        for p in PATTERNS:
            r = rows.get(f"{key} {p}")
            if r is None:
                cells.append("n/a" if key == "proximal" else "-")
            else:
                text = f"{r['ppl']:.3f}"
                cells.append((f"**{text}**" if r["ppl"] == best[p] else text) + f" / {_news(r)}")
        r24 = rows.get(f"{key} 2:4")
        cells.append(f"{r24['prune_seconds']:.0f}" if r24 else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    shown = [rows[f"{key} {p}"] for key in METHODS for p in PATTERNS if f"{key} {p}" in rows]
    commits = sorted({_short_commit(r) for r in shown})
    lines += [
        "",
        f"Perplexity on the protocol text / on the second text, news prose nothing is fitted on (dense {dense['ppl']:.3f} / "
        f"{_news(dense)}; {dense['tokens']:,} scored tokens of the protocol text), best protocol figure per column in bold; "
        "`-` after the slash: measured before the second text joined the protocol, not rerun yet. "
        f"Rows measured at commits {', '.join(f'`{c}`' for c in commits)}; each row's commit, date, load average "
        "and command are in [benchmarks/results/prune_quality.md](benchmarks/results/prune_quality.md).",
    ]
    return "\n".join(lines)


def llmcompressor() -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llmcompressor_compare import summary_table  # the benchmark's own rendering of its medians

    data = _load("llmcompressor.json")
    lines = summary_table(data)
    prov = data["provenance"]
    load = prov["load_average"]
    lines += ["", f"Whole processes, one interleaved run ({data['reps']} repetition(s), medians), measured {prov['date']} at commit "
              f"`{_short_commit(data)}`, load average {load['start'][0]:.2f} at the start and {load['end'][0]:.2f} at the end. "
              "Ratios are graphprune / llm-compressor."]
    return "\n".join(lines)


def calib_dtype() -> str:
    data = _load("calib_dtype.json")
    prov = data["provenance"]
    load = prov["load_average"]
    lines = [
        "| configuration | whole process s, float32 -> bfloat16 | pipeline s, float32 -> bfloat16 | float32 ppl pydoc / news "
        "| bfloat16 ppl pydoc / news | change pydoc / news |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, s in data["summary"].items():
        f, b, ch = s["float32"], s["bfloat16"], s["ppl_rel_change"]
        lines.append(
            f"| {key} | {f['wall_seconds']:.1f} -> {b['wall_seconds']:.1f} ({s['wall_speedup']:.2f}x) | "
            f"{f['prune_seconds']:.1f} -> {b['prune_seconds']:.1f} ({s['pipeline_speedup']:.2f}x) | "
            f"{f['ppl']['pydoc']:.3f} / {f['ppl']['news']:.3f} | {b['ppl']['pydoc']:.3f} / {b['ppl']['news']:.3f} | "
            f"{ch['pydoc'] * 100:+.2f} % / {ch['news'] * 100:+.2f} % |"
        )
    lines += ["", f"Whole process: `graphprune prune ... --eval` from start to saved folder; pipeline: the report's `prune_seconds` "
              f"(calibration forwards, statistics, solvers). One interleaved run ({data['reps']} repetition(s)), "
              f"measured {prov['date']} at commit `{_short_commit(data)}`, load average {load['start'][0]:.2f} at the start and "
              f"{load['end'][0]:.2f} at the end; peak matmul rate in the same run {data['peak_gflops']['float32']} GFLOP/s float32, "
              f"{data['peak_gflops']['bfloat16']} GFLOP/s bfloat16 (native bfloat16: {'yes' if data['native_bf16'] else 'no'})."]
    return "\n".join(lines)


def rotations() -> str:
    rows = _load("rotations.json")["rows"]
    configs = (("no rotation", ""), ("PCA", "pca + "), ("random Hadamard", "hadamard + "), ("learned (Cayley SGD)", "learned + "),
               ("learned from PCA", "learned (PCA start) + "))
    lines = ["| configuration | Wanda 50 % pydoc | Wanda 50 % news | SparseGPT 50 % pydoc | SparseGPT 50 % news |", "|---|---:|---:|---:|---:|"]
    cells: dict[str, list[float | None]] = {}
    news: dict[str, list[str]] = {}
    for label, prefix in configs:
        w = rows.get(f"{prefix}wanda 50%")
        s = rows.get(f"{prefix}sparsegpt 50%")
        if not prefix:  # the unrotated rows are the pruning benchmark's
            quality = _load("prune_quality.json")
            w, s = quality.get("wanda 50%"), quality.get("sparsegpt 50%")
        if prefix.startswith("learned (") and w is None and s is None:
            continue  # an optional variant not measured
        cells[label] = [w["ppl"] if w else None, s["ppl"] if s else None]
        news[label] = [_news(w), _news(s)]
    best = [min(v[i] for v in cells.values() if v[i] is not None) for i in range(2)]
    for label, vals in cells.items():
        out = ["-" if v is None else (f"**{v:.3f}**" if v == best[i] else f"{v:.3f}") for i, v in enumerate(vals)]
        lines.append(f"| {label} | {out[0]} | {news[label][0]} | {out[1]} | {news[label][1]} |")
    sliced = sorted((r for r in rows.values() if r.get("slicing")), key=lambda r: r["slicing"])
    if sliced:
        parts = [f"{r['slicing']:.0%} (width {r['width']}) {r['ppl']:.3f} / {_news(r)}" for r in sliced]
        lines += ["", "PCA slicing without pruning (pydoc / news): " + ", ".join(parts) + "."]
    lines += ["", "Best protocol-text figure per column in bold; `-` in a news column: measured before the second text joined "
              "the protocol, not rerun yet."]
    return "\n".join(lines)


def _speedups(records: list[dict[str, Any]], targets: list[str]) -> list[str]:
    """Rows (case, runtime), columns ``targets``: paired speed-up [IQR]; decode cells add tokens/s."""
    order: list[tuple[str, str]] = []
    cell: dict[tuple[str, str, str], str] = {}
    shape: dict[str, str] = {}
    for r in records:
        key = (r["case"], r["runtime"])
        if key not in order:
            order.append(key)
        decode = r.get("kind") == "decode"
        shape[r["case"]] = f"{r['batch']}x{r['seq']}" + (f"+{r['new_tokens']}" if decode else "")
        value = "1.00x" if r["target"] == r["baseline"] else f"{r['speedup']:.2f}x [{r['speedup_q1']:.2f}, {r['speedup_q3']:.2f}]"
        if decode:
            value += f", {r['tokens_per_s']:.1f} tok/s"
        cell[(r["case"], r["runtime"], r["target"])] = value
    lines = ["| case | runtime | " + " | ".join(targets) + " |", "|---|---|" + "---:|" * len(targets)]
    for case, runtime in order:
        row = [f"{case} {shape[case]}", runtime] + [cell.get((case, runtime, t), "-") for t in targets]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def latency() -> str:
    data = _load("latency.json")
    lines = _speedups(data["records"], [t for t in data["targets"] if t != "dense"])
    lines += ["", f"Measured {data['started'][:10]} at commit `{_short_commit(data)}` by `{data['provenance']['command']}`; machine, "
              "load average and every time in [benchmarks/results/latency.md](benchmarks/results/latency.md)."]
    return "\n".join(lines)


def decode() -> str:
    data = _load("decode.json")
    lines = _speedups(data["records"], list(data["targets"]))
    prov = data["provenance"]
    lines += ["", f"Measured {prov['date'][:10]} at commit `{_short_commit(data)}` by `{prov['command']}`; machine, "
              "load average, file sizes, the greedy checks and every time in [benchmarks/results/decode.md](benchmarks/results/decode.md)."]
    return "\n".join(lines)


def decode_kernels() -> str:
    data = _load("decode_kernels.json")
    lines = [
        "| model / runtime | tokens/s | vs dense onnxruntime | vs dense torch.compile | weight MB per step | logits vs dense eager |",
        "|---|---:|---:|---:|---:|---|",
    ]
    models = data["models"]

    def fmt(r: list[float]) -> str:
        return f"{r[1]:.2f}x [{r[0]:.2f}, {r[2]:.2f}]"

    for row in data["rows"]:
        name, runtime = row["pair"].split(" / ")
        m = models.get(name, {})
        mb = f"{m['step_bytes'] / 1e6:.0f}" if "step_bytes" in m and runtime != "onnxruntime" else ""
        chk = m.get("logits_check") if runtime.startswith("compile+") else None
        check = f"max rel diff {chk['max_rel_diff']:.1e}{'' if chk['same_tokens'] else ' (tokens differ)'}" if chk else ""
        lines.append(f"| {row['pair']} | {row['tokens_per_s']:.1f} | {fmt(row['vs dense / onnxruntime'])} | "
                     f"{fmt(row['vs dense / compile'])} | {mb} | {check} |")
    prov = data["provenance"]
    lines += ["", f"Measured {prov['date'][:10]} at commit `{_short_commit(data)}` by `{prov['command']}` ({data['native_isa']} "
              "kernels); machine, load average, kernel choices and every time in "
              "[benchmarks/results/decode_kernels.md](benchmarks/results/decode_kernels.md)."]
    return "\n".join(lines)


def shipped() -> str:
    data = _load("shipped.json")
    lines = ["| model | PyTorch | onnxruntime (.onnx) | relative difference |", "|---|---:|---:|---:|"]
    for row in data["perplexity"]:
        lines.append(f"| {row['model']} | {row['pytorch']:.4f} | {row['onnxruntime']:.4f} | {row['onnxruntime_rel_diff'] * 100:+.4f} % |")
    pre = data.get("prefill_last_position")
    if pre:
        lines += ["", f"Prefill 1x128 of the dense model in onnxruntime, LM head on the last position (generation export) vs on "
                      f"every position (logits export): {pre['speedup']:.2f}x [{pre['speedup_q1']:.2f}, {pre['speedup_q3']:.2f}] "
                      f"faster, paired over {pre['repeats']} repeats."]
    prov = data["provenance"]
    lines += ["", f"Measured {prov['date'][:10]} at commit `{_short_commit(data)}` by `{prov['command']}`; details in "
                  "[benchmarks/results/shipped.md](benchmarks/results/shipped.md)."]
    return "\n".join(lines)


def deploy() -> str:
    if not (RESULTS / "deploy.json").is_file():
        return "No results committed yet: run `python benchmarks/deploy.py`."
    data = _load("deploy.json")
    tables, prov = data["tables"], data["provenance"]
    lines = [tables["int8"], tables["acceptance"], "", tables["peers"]]
    lines += [f"Measured {prov['date'][:10]} at commit `{_short_commit(data)}` by `{prov['command']}`; machine, load average, "
              "the greedy checks, operator counts, Optimum's status and every time in "
              "[benchmarks/results/deploy.md](benchmarks/results/deploy.md)."]
    return "\n".join(lines)


def structured() -> str:
    if not (RESULTS / "structured.json").is_file():
        return "No results committed yet: run `python benchmarks/structured.py`."
    data = _load("structured.json")
    prov = data["provenance"]
    ratios: dict[str, dict[str, str]] = {}
    cols: list[str] = []
    for rec in data["records"]:
        col = f"{rec['case']} {rec['runtime']}"
        if col not in cols:
            cols.append(col)
        ratios.setdefault(rec["target"], {})[col] = f"{rec['speedup']:.2f}x [{rec['speedup_q1']:.2f}, {rec['speedup_q3']:.2f}]"
    lines = [
        "| model | perplexity | parameters | block parameters removed | MLP width | heads (query/KV) | " + " | ".join(f"{c} speedup" for c in cols) + " |",
        "|---|---:|---:|---:|---|---|" + "---|" * len(cols),
    ]
    for name, m in data["models"].items():
        removed = m.get("block_parameters_removed")
        widths = m.get("mlp_width") or []
        width = "-" if not widths else (str(widths[0]) if len(widths) == 1 else f"{min(widths)}-{max(widths)}")
        heads = ", ".join(m.get("heads") or []) or "-"
        cells = ["1.00x" if name == "dense" else ratios.get(name, {}).get(c, "-") for c in cols]
        lines.append(
            f"| {name} | {m['ppl']:.3f} | {m['parameters']:,} | {'-' if removed is None else f'{removed:.1%}'} | {width} | {heads} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", f"Measured {prov['date'][:10]} at commit `{_short_commit(data)}` by `{prov['command']}`; load average and every "
              "time in [benchmarks/results/structured.md](benchmarks/results/structured.md); plot: "
              "[benchmarks/results/structured.png](benchmarks/results/structured.png)."]
    return "\n".join(lines)


def structured_layers() -> str:
    if not (RESULTS / "structured_layers.json").is_file():
        return "No results committed yet: run `python benchmarks/structured_layers.py`."
    data = _load("structured_layers.json")
    prov, rows = data["provenance"], data["rows"]
    lines = ["| method | mean relative error | layers where it is lower than Wanda-sp | solver seconds (30 layers) |", "|---|---:|---:|---:|"]
    for method, err in data["mean"].items():
        lower = sum(r[method]["rel_error"] < r["wanda-sp"]["rel_error"] for r in rows)
        lines.append(f"| {method} | {err:.4f} | {lower} of {len(rows)} | {data['seconds'][method]:.0f} |")
    heads = data.get("heads")
    if heads and heads["rows"]:
        n = len(heads["rows"])
        lines += ["", "| method (attention output projections) | mean relative error | layers where it is lower than Wanda-sp | solver seconds |",
                  "|---|---:|---:|---:|"]
        for method, err in heads["mean"].items():
            lower = sum(r[method]["rel_error"] < r["wanda-sp"]["rel_error"] for r in heads["rows"])
            lines.append(f"| {method} | {err:.4f} | {lower} of {n} | {heads['seconds'][method]:.1f} |")
    lines += ["", f"{int(round(data['keep'] * 100))} % of each down projection's input channels kept"
              + (f", {heads['keep_heads']} query heads of each KV group in each output projection" if heads else "")
              + ", on the dense model's statistics. "
              f"Measured {prov['date'][:10]} at commit `{_short_commit(data)}` by `{prov['command']}`; per-layer errors in "
              "[benchmarks/results/structured_layers.md](benchmarks/results/structured_layers.md)."]
    return "\n".join(lines)


def zoo() -> str:
    data = _load("zoo_matrix.json")
    caps = data["capabilities"]
    cells = {(c["family"], c["capability"]): c for c in data["cells"]}
    reasons: list[str] = []
    lines = ["| family | " + " | ".join(caps) + " |", "|---|" + ":---:|" * len(caps)]
    for fam in data["families"]:
        row = []
        for cap in caps:
            cell = cells.get((fam, cap))
            if cell is None:
                row.append("")
            elif cell["ok"]:
                row.append("yes")
            else:
                if cell["gap"] not in reasons:
                    reasons.append(cell["gap"])
                row.append(f"no ({reasons.index(cell['gap']) + 1})")
        lines.append(f"| {fam} | " + " | ".join(row) + " |")
    prov = data["provenance"]
    lines += [""] + [f"({i}) {r}." for i, r in enumerate(reasons, 1)]
    lines += ["", f"Checked at commit `{prov['commit'].split(' ')[0]}` ({prov['date']}); each failure's error message is in "
              "[benchmarks/results/zoo_matrix.md](benchmarks/results/zoo_matrix.md)."]
    return "\n".join(lines)


def generalization() -> str:
    """In-domain (protocol text) against out-of-domain (news) degradation of every configuration
    measured on both texts; the mixed-calibration rows say that news was in their calibration."""
    dense = _load("dense.json")
    if "ppl_news" not in dense:
        return "No configuration measured on both texts yet: run `python benchmarks/prune_quality.py --only dense \"sparsegpt 50%\"`."
    quality = _load("prune_quality.json")
    rotated = _load("rotations.json")["rows"]
    order = [f"{m} {p}" for p in PATTERNS for m in METHODS]
    entries: list[tuple[str, dict[str, Any]]] = [(n, quality[n]) for n in order if n in quality and "ppl_news" in quality[n]]
    entries += [(n, r) for n, r in quality.items() if n not in order and "ppl_news" in r and "calib_samples=" not in n]
    entries += [(n, r) for n, r in rotated.items() if "ppl_news" in r and n not in quality]
    lines = [
        "| configuration | calibrated on | pydoc ppl | news ppl | pydoc / dense | news / dense | news penalty |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| dense | - | {dense['ppl']:.3f} | {dense['ppl_news']:.3f} | 1.00x | 1.00x | 1.00x |",
    ]
    for name, r in entries:
        calib = "pydoc + news (equal shares)" if "calib=pydoc+news" in name else "pydoc"
        label = name.replace(" calib=pydoc+news", "")
        a, b = r["ppl"] / dense["ppl"], r["ppl_news"] / dense["ppl_news"]
        lines.append(f"| {label} | {calib} | {r['ppl']:.3f} | {r['ppl_news']:.3f} | {a:.2f}x | {b:.2f}x | {b / a:.2f}x |")
    lines += ["", "`pydoc / dense` and `news / dense`: perplexity relative to the dense model's on the same text; `news penalty`: "
              "their ratio, above 1 where pruning costs more on the text it was not calibrated on. Rows from "
              "[prune_quality.md](benchmarks/results/prune_quality.md) and [rotations.md](benchmarks/results/rotations.md), "
              "each with its commit, date and load."]
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {
    "prune_quality": prune_quality,
    "generalization": generalization,
    "llmcompressor": llmcompressor,
    "calib_dtype": calib_dtype,
    "rotations": rotations,
    "latency": latency,
    "decode": decode,
    "decode_kernels": decode_kernels,
    "shipped": shipped,
    "deploy": deploy,
    "zoo": zoo,
    "structured": structured,
    "structured_layers": structured_layers,
}


def render(readme: str) -> str:
    for name, fn in TABLES.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(.*?)(<!-- /table:{name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no <!-- table:{name} --> ... <!-- /table:{name} --> block.")
        table = fn()
        readme = pattern.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(3), readme)
    return readme


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md differs from what the results give")
    args = ap.parse_args()
    current = README.read_text(encoding="utf-8")
    new = render(current)
    if args.check:
        if new != current:
            print("README.md tables are out of date: run python scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
