"""Peak memory of ``graphprune prune --lazy`` on a LLaMA-2-7B-shaped model, measured.

A model with LLaMA-2-7B's block shapes (hidden 4096, MLP 11008, 32 heads, float32) and a few
blocks is built from a config with random weights and saved as a safetensors folder; then
``graphprune prune --lazy --method sparsegpt --sparsity 0.5`` runs on it in its own process,
and its peak RSS (``wait4``) is compared with the formula of docs/SCALE_OUT.md:

    peak ≈ fixed overhead + embedding and LM head + one block's weights
           + that block's statistics (float64 XᵀX) + the stage activations
           + the solver's workspace for the widest Linear

Every term is computed from the shapes, except the fixed overhead, which is measured: the
peak RSS of the same command on a one-block model whose width is 64 (torch, transformers,
the tokenizer, the graph, no weights to speak of). Models are built in a child process, since
a child's peak RSS starts from its parent's resident size at the fork. The vocabulary is the default
tokenizer's (49,152 rather than LLaMA-2's 32,000), so the calibration text tokenizes
unchanged.

    python benchmarks/memory_7b.py --blocks 2

writes ``results/memory_7b.json`` and ``results/memory_7b.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import Run, measured_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIB = 1024.0 * 1024.0

SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}
SHAPE_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}


def build(folder: Path, shape: dict[str, int], blocks: int) -> int:
    """Write a random float32 LLaMA folder of ``shape`` with the default tokenizer; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from graphprune.models.loader import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    config = LlamaConfig(**shape, num_hidden_layers=blocks, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm scales
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def prune(folder: Path, out: Path, samples: int, length: int, batch: int) -> dict[str, Any]:
    """``graphprune prune --lazy`` in its own process: wall seconds, peak RSS (MiB, ``wait4``) and its report."""
    cmd = [sys.executable, "-m", "graphprune", "prune", "--model", str(folder), "--method", "sparsegpt", "--sparsity", "0.5", "--lazy",
           "--calib-samples", str(samples), "--calib-len", str(length), "--batch-size", str(batch), "--out", str(out), "--json", "-q"]
    print("$ " + " ".join(["python", *cmd[1:]]), flush=True)
    wall, peak, stdout = measured_process(cmd, out.with_suffix(".log"))
    report = json.loads(stdout[stdout.find("{"):])
    return {"wall_seconds": round(wall, 1), "peak_rss_mb": round(peak, 1), "report": report}


def formula(shape: dict[str, int], vocab: int, samples: int, length: int, batch: int) -> dict[str, float]:
    """The terms of the peak (MiB) besides the fixed overhead, from the shapes (float32 weights and
    activations, float64 statistics)."""
    h, m = shape["hidden_size"], shape["intermediate_size"]
    heads = shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * (h // heads)
    tokens = samples * length
    micro = batch * length
    block = (h * (h + 2 * kv) + h * h + 2 * h * m + m * h + 2 * h) * 4
    # Hessians: q/k/v share one (h x h), o one (h x h), gate/up one (h x h), down one (m x m)
    stats = (3 * h * h + m * m) * 8
    activations = (tokens + micro) * h * 4  # the stage's hidden states: the inputs, replaced batch by batch by the outputs
    intermediates = (3 * micro * m + 2 * batch * heads * length * length) * 4  # one micro-batch: MLP and attention scores
    # SparseGPT on down_proj: float64 H copy and its inverse factor, float32 weight and its working copy
    solver = 2 * m * m * 8 + 2 * h * m * 4
    embeddings = 2 * vocab * h * 4  # embedding and untied LM head stay materialised
    return {k: v / MIB for k, v in {"embedding_and_head": embeddings, "one_block_weights": block, "block_statistics": stats,
                                    "stage_activations": activations, "micro_batch_intermediates": intermediates,
                                    "solver_workspace": solver}.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward (graphprune's default)")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from the results file")
    ap.add_argument("--keep", action="store_true", help="keep the model folders")
    ap.add_argument("--build", nargs=3, metavar=("FOLDER", "SHAPE", "BLOCKS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        folder, key, blocks = args.build
        print(build(Path(folder), SHAPE_7B if key == "7b" else SHAPE_SMALL, int(blocks)))
        return
    if args.render:
        render()
        return
    run = Run()
    work = Path(tempfile.mkdtemp(prefix="gp-mem7b-"))
    try:
        measured: dict[str, Any] = {}
        for key, shape, blocks in (("overhead", SHAPE_SMALL, 1), ("7b", SHAPE_7B, args.blocks)):
            folder = work / f"model-{key}"
            t0 = time.perf_counter()
            # built in a child process: a child's peak RSS (wait4) starts from its parent's resident
            # size at the fork, so this driver must stay small (it never holds a model itself)
            built = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", str(folder), key, str(blocks)],
                                   check=True, capture_output=True, text=True, cwd=ROOT)
            params = int(built.stdout.split()[-1])
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / MIB
            print(f"{key}: {params:,} parameters, {size:.0f} MiB of safetensors, built in {time.perf_counter() - t0:.0f} s", flush=True)
            res = prune(folder, work / f"out-{key}", args.calib_samples, args.calib_len, args.batch_size)
            measured[key] = {"shape": shape, "blocks": blocks, "parameters": params, "folder_mib": round(size), **res}
            print(f"    peak RSS {res['peak_rss_mb']:.0f} MiB, {res['wall_seconds']:.0f} s", flush=True)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        vocab = int(json.loads((work / "out-7b" / "config.json").read_text())["vocab_size"])
        batch = args.batch_size
        terms = formula(SHAPE_7B, vocab, args.calib_samples, args.calib_len, batch)
        overhead = float(measured["overhead"]["peak_rss_mb"])
        predicted = overhead + sum(terms.values())
        peak = float(measured["7b"]["peak_rss_mb"])
        data = run.stamp({
            "calibration": {"samples": args.calib_samples, "length": args.calib_len, "batch_size": batch},
            "vocab_size": vocab,
            "measured": {k: {**{kk: vv for kk, vv in v.items() if kk != "report"},
                             "report_peak_rss_mb": v["report"].get("peak_rss_mb"),
                             "stages": [{"block": s.get("block"), "peak_rss_mb": s.get("peak_rss_mb"), "seconds": s.get("seconds")}
                                        for s in v["report"].get("stages", [])]} for k, v in measured.items()},
            "formula_mib": {"fixed_overhead (measured, width-64 model)": overhead, **{k: round(v, 1) for k, v in terms.items()}},
            "predicted_peak_mib": round(predicted),
            "measured_peak_mib": round(peak),
            "ratio": round(peak / predicted, 3),
        })
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "memory_7b.json").write_text(json.dumps(data, indent=2) + "\n")
        render()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def render() -> None:
    data = json.loads((RESULTS / "memory_7b.json").read_text())
    prov = data["provenance"]
    m7 = data["measured"]["7b"]
    cal = data["calibration"]
    lines = [
        "# Peak memory of a lazy prune of a LLaMA-2-7B-shaped model",
        "",
        f"Generated by `python benchmarks/memory_7b.py` (`{prov['command']}`), commit `{prov['commit']}`, {prov['date']}, load average "
        f"{prov['load_average']['start']} at the start and {prov['load_average']['end']} at the end.",
        "",
        f"Model: LLaMA-2-7B block shapes (hidden 4096, MLP 11008, 32 heads), {m7['blocks']} blocks, vocabulary {data['vocab_size']:,}, "
        f"random float32 weights ({m7['parameters']:,} parameters, {m7['folder_mib']:,} MiB of safetensors). Job: "
        f"`graphprune prune --lazy --method sparsegpt --sparsity 0.5`, calibration {cal['samples']} x {cal['length']} tokens in "
        f"micro-batches of {cal['batch_size']}. Peak RSS is the process's high-water mark.",
        "",
        "| term | MiB |",
        "|---|---:|",
    ]
    for k, v in data["formula_mib"].items():
        lines.append(f"| {k.replace('_', ' ')} | {v:,.0f} |")
    lines += [
        f"| **predicted peak** | **{data['predicted_peak_mib']:,}** |",
        f"| **measured peak** | **{data['measured_peak_mib']:,}** |",
        "",
        f"Measured / predicted: **{data['ratio']:.2f}x**. Wall time {m7['wall_seconds']:.0f} s.",
        "",
        "Per stage (the high-water mark at the end of each block's stage):",
        "",
        "| block | peak RSS MiB so far | seconds |",
        "|---:|---:|---:|",
    ]
    for s in m7["stages"]:
        lines.append(f"| {s['block']} | {s['peak_rss_mb']:,.0f} | {s['seconds']:.0f} |")
    (RESULTS / "memory_7b.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "memory_7b.md").read_text())


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
