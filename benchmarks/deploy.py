"""What a deployed model costs and gives in onnxruntime: int8 on top of pruning, and the peers' files.

1. **Files.** Every model (``dense``, and the pruned folders given with ``--use NAME=DIR``)
   is exported twice per precision, float32 and int8 (``--quantize int8``: onnxruntime's
   dynamic quantization, per-channel int8 weights): a logits file (``input_ids -> logits``)
   for perplexity, and a generation folder (KV cache, last-position logits) for speed. Pruned
   models also get an int8 logits file with sparse initializers (the smallest file).
2. **Quality.** Perplexity per docs/PROTOCOL.md through each logits file in onnxruntime
   (``graphprune eval --model FILE.onnx``).
3. **Peers.** The dense model as onnxruntime-genai's model builder writes it (float32, and
   int4 for reference; ``pip install onnxruntime-genai``), from the same weights saved as a
   Hugging Face folder. Optimum's ONNX export is tried too; the results say why it did not
   run when it does not. The peer folders run through graphprune's decoding loop (their
   ``genai_config.json`` is read like a ``generation.json``), so every file is timed the same
   way; each peer file's greedy tokens are compared with eager PyTorch's.
4. **Speed, one interleaved run.** ``bench_latency`` over all generation files in onnxruntime
   (CPUExecutionProvider, spin-waiting off): ``ttft-128``, ``ttft-512``, ``decode-b1``,
   ``decode-b8``, paired against graphprune's dense float32 file.

    python benchmarks/deploy.py --use sparsegpt-50=DIR --use sparsegpt-2of4=DIR --use sliced-30=DIR

Writes benchmarks/results/deploy.{md,json}.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import say  # noqa: E402
from provenance import Run  # noqa: E402

from graphprune.bench import CASE_GROUPS, BenchTarget, bench_latency, machine_info, to_markdown  # noqa: E402
from graphprune.exporters import export_onnx  # noqa: E402
from graphprune.exporters.generation import export_generation  # noqa: E402
from graphprune.exporters.runners import EagerRunner, check_prompts, generate, load_runner  # noqa: E402
from graphprune.fileio import write_json, write_text  # noqa: E402
from graphprune.models import load_model  # noqa: E402
from graphprune.pipeline import EvalJob, run_eval  # noqa: E402
from graphprune.pipeline.export_bench import linear_sparsity, load_average, mib, summary_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: pruned models' logits are larger; float32 reassociation over 30 layers
ATOL = 1e-2
BASELINE = "graphprune dense float32"


def op_histogram(path: Path, top: int = 8) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return ", ".join(f"{op} {n}" for op, n in counts.most_common(top)) + f" ({sum(counts.values())} nodes)"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))


def greedy_agreement(reference: EagerRunner, folder: Path, tokens: int = 32) -> int:
    """Greedy steps (batch 1, a 11-token prompt) the file agrees with eager PyTorch before the first difference."""
    ids, mask = check_prompts(reference.layout.vocab, lengths=(11,))
    want = generate(reference, ids, mask, max_new_tokens=tokens, stop_at_eos=False)
    got = generate(load_runner(folder), ids, mask, max_new_tokens=tokens, stop_at_eos=False)
    same = (want.tokens == got.tokens).all(dim=0)
    return int(same.long().cumprod(0).sum())


def ppl(path: Path, tokenizer_dir: Path) -> float:
    res = run_eval(EvalJob(model=str(path), tokenizer=str(tokenizer_dir)), progress=False)
    return float(res["ppl"])


def build_genai(hf: Path, out: Path, precision: str) -> dict[str, Any]:
    if (out / "genai_config.json").is_file():
        return {"folder": str(out), "seconds": None, "reused": True}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "HuggingFaceTB/SmolLM2-135M-Instruct",
           "-i", str(hf), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"onnxruntime-genai's builder failed ({precision}):\n{proc.stderr[-2000:]}")
    return {"folder": str(out), "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd[1:])}


def optimum_status() -> str:
    """Whether Optimum's ONNX exporter can run with the installed transformers, and why not."""
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        reqs = requires("optimum-onnx") or []
    except PackageNotFoundError:
        return (
            "not run: optimum-onnx is not installed; its latest release (0.1.0) requires transformers<4.58, "
            f"and this environment has transformers {version('transformers')}."
        )
    pins = [r for r in reqs if r.startswith("transformers")]
    return f"installed ({version('optimum-onnx')}, requires {pins}); not part of this run."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--use", action="append", default=[], metavar="NAME=DIR", help="a pruned model folder to include")
    ap.add_argument("--work", default=str(ROOT / "out" / "deploy"), help="folder for the exported files (reused when present)")
    ap.add_argument("--cases", nargs="+", default=["ttft", "decode"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-peers", action="store_true", help="skip onnxruntime-genai")
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity of the logits files")
    ap.add_argument("--load-note", default="")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--rerender", action="store_true", help="only rewrite deploy.md and the tables from deploy.json's records")
    args = ap.parse_args()
    if args.rerender:
        rerender(Path(args.results))
        return
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    run = Run()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = [c for name in args.cases for c in CASE_GROUPS[name]]

    sources = {"dense": args.model, **dict(item.split("=", 1) for item in args.use)}
    models: dict[str, dict[str, Any]] = {}
    generation: dict[str, Path] = {}
    eager: EagerRunner | None = None
    for name, source in sources.items():
        lm = load_model(source)
        if name == "dense":
            eager = EagerRunner(lm.model)
            hf = work / "hf-dense"
            if not (hf / "config.json").is_file():
                lm.model.save_pretrained(str(hf))
                lm.tokenizer.save_pretrained(str(hf))
        info: dict[str, Any] = {"source": source, **linear_sparsity(lm.model), "parameters": sum(p.numel() for p in lm.model.parameters()), "files": {}}
        for quant in (None, "int8"):
            tag = "int8" if quant else "float32"
            folder = work / f"{name}-{tag}-generation"
            report = folder / "export.json"
            if not report.is_file():
                say(f"{name}: {tag} generation export ...")
                rep = export_generation(lm.model, folder, tokenizer=lm.tokenizer, quantize=quant, atol=ATOL, overwrite=True)
                write_json(report, {k: v for k, v in rep.to_dict().items() if k != "layout"})
            generation[f"graphprune {name} {tag}"] = folder
            info["files"][f"generation {tag}"] = json.loads(report.read_text())
            variants = [(f"{name}-{tag}.onnx", False)] + ([(f"{name}-{tag}-sparse.onnx", True)] if quant and name != "dense" else [])
            for file_name, sparse in variants:
                path = work / file_name
                meta = path.with_suffix(".json")
                if not meta.is_file():
                    say(f"{name}: {file_name} ...")
                    rep = export_onnx(lm.model, path, atol=ATOL, quantize=quant, sparse_initializers=sparse)
                    write_json(meta, rep.to_dict())
                info["files"][file_name] = json.loads(meta.read_text())
        (work / f"{name}-tokenizer").mkdir(exist_ok=True)
        lm.tokenizer.save_pretrained(str(work / f"{name}-tokenizer"))
        models[name] = info
        del lm

    peers: dict[str, Any] = {"optimum": optimum_status()}
    if not args.no_peers:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise SystemExit("onnxruntime-genai is not installed: pip install onnxruntime-genai (or pass --no-peers).")
        from importlib.metadata import version

        peers["onnxruntime_genai"] = version("onnxruntime-genai")
        for precision in ("fp32", "int4"):
            say(f"onnxruntime-genai model builder, {precision} ...")
            built = build_genai(work / "hf-dense", work / f"genai-{precision}", precision)
            folder = Path(built["folder"])
            name = f"onnxruntime-genai dense {'float32' if precision == 'fp32' else 'int4'}"
            generation[name] = folder
            assert eager is not None
            peers[name] = {**built, "bytes": folder_bytes(folder), "ops": op_histogram(folder / "model.onnx"), "greedy_agreement_32": greedy_agreement(eager, folder)}

    files_info: dict[str, Any] = {}
    for name, folder in generation.items():
        model_file = folder / "model.onnx"
        files_info[name] = {"folder": str(folder), "bytes": folder_bytes(folder), "ops": op_histogram(model_file)}
        if name.startswith("graphprune") and eager is not None:
            files_info[name]["greedy_agreement_32"] = greedy_agreement(eager, folder) if "dense" in name else None

    quality: dict[str, Any] = {}
    if not args.no_ppl:
        for name, info in models.items():
            for file_name in info["files"]:
                if not file_name.endswith(".onnx"):
                    continue
                cached = (work / file_name).with_suffix(".ppl.json")
                if cached.is_file():  # the logits files only change when they are exported again
                    quality[file_name] = float(json.loads(cached.read_text())["ppl"])
                    continue
                say(f"perplexity through {file_name} ...")
                quality[file_name] = ppl(work / file_name, work / f"{name}-tokenizer")
                write_json(cached, {"ppl": quality[file_name]})

    targets = [BenchTarget(BASELINE, generation={"onnxruntime": generation["graphprune dense float32"]})]
    targets += [BenchTarget(n, generation={"onnxruntime": f}) for n, f in generation.items() if n != "graphprune dense float32"]
    load: dict[str, Any] = {"start": load_average()}
    say(f"onnxruntime: {len(targets)} files, {', '.join(c.name for c in cases)}, {args.repeats} repeats ...")
    vocab = load_runner(generation["graphprune dense float32"]).layout.vocab
    result = bench_latency(targets, ["onnxruntime"], cases, repeats=args.repeats, warmup=args.warmup, vocab_size=vocab, progress=False)
    load["end"] = load_average()
    machine = machine_info()
    provenance = run.stamp({})["provenance"]
    data = {
        "provenance": provenance,
        "machine": machine,
        "load_average": load,
        "load_note": args.load_note,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "models": models,
        "files": files_info,
        "peers": peers,
        "perplexity": quality,
        "records": result.to_dicts(),
    }
    data["tables"] = tables(data)
    out = Path(args.results)
    write_json(out / "deploy.json", data)
    write_text(out / "deploy.md", markdown(data, result, args.model))
    say(f"wrote {out / 'deploy.md'} and deploy.json")


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tps(records: list[dict[str, Any]], target: str, case: str) -> float | None:
    for r in records:
        if r["target"] == target and r["case"] == case:
            return r.get("tokens_per_s") or None
    return None


def _speedup(records: list[dict[str, Any]], target: str, case: str) -> str:
    """Paired speedup vs graphprune's dense float32 file, median [IQR] (CPU figures are ratios)."""
    for r in records:
        if r["target"] == target and r["case"] == case:
            return f"{r['speedup']:.2f}x [{r['speedup_q1']:.2f}, {r['speedup_q3']:.2f}]"
    return "-"


def tables(data: dict[str, Any]) -> dict[str, str]:
    return {"int8": int8_table(data), "peers": peers_table(data), "acceptance": acceptance(data)}


def rerender(results: Path) -> None:
    """Rewrite deploy.md and the tables in deploy.json from the records already there."""
    from graphprune.bench import BenchResult, LatencyRecord

    data = json.loads((results / "deploy.json").read_text())
    fields = set(LatencyRecord.__dataclass_fields__)
    records = [LatencyRecord(**{k: v for k, v in r.items() if k in fields}) for r in data["records"]]
    result = BenchResult(records=records, machine=data["machine"], baseline=BASELINE, repeats=data["repeats"], warmup=data["warmup"])
    data["tables"] = tables(data)
    write_json(results / "deploy.json", data)
    write_text(results / "deploy.md", markdown(data, result, data.get("model", "smollm2-135m")))


def int8_table(data: dict[str, Any]) -> str:
    records = data["records"]
    lines = [
        "| model | weight sparsity | precision | perplexity (onnxruntime) | decode b1 tok/s | decode b8 tok/s | ttft-128 speedup | generation file | smallest logits file |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, info in data["models"].items():
        for tag in ("float32", "int8"):
            target = BASELINE if (name, tag) == ("dense", "float32") else f"graphprune {name} {tag}"
            gen = info["files"][f"generation {tag}"]
            sizes = [f["bytes"] for n, f in info["files"].items() if n.endswith(".onnx") and n.startswith(f"{name}-{tag}")]
            cells = [
                name, f"{info['sparsity']:.3f}", tag, _num(data["perplexity"].get(f"{name}-{tag}.onnx"), 3),
                _num(_tps(records, target, "decode-b1"), 1), _num(_tps(records, target, "decode-b8"), 1),
                _speedup(records, target, "ttft-128"), mib(gen["bytes"]), mib(min(sizes)) if sizes else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def peers_table(data: dict[str, Any]) -> str:
    records = data["records"]
    names = list(dict.fromkeys(r["target"] for r in records))
    lines = [
        "| file | size | ttft-128 speedup | ttft-512 speedup | decode b1 tok/s | decode b8 tok/s | decode b1 speedup |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        if not (name == BASELINE or "dense" in name):
            continue
        key = "graphprune dense float32" if name == BASELINE else name
        f = data["files"][key]
        cells = [name, mib(f["bytes"]), _speedup(records, name, "ttft-128"), _speedup(records, name, "ttft-512"),
                 _num(_tps(records, name, "decode-b1"), 1), _num(_tps(records, name, "decode-b8"), 1), _speedup(records, name, "decode-b1")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def acceptance(data: dict[str, Any]) -> str:
    records = data["records"]
    peer = "onnxruntime-genai dense float32"
    parts = []
    for case in ("decode-b1", "decode-b8"):
        ours, theirs = _tps(records, BASELINE, case), _tps(records, peer, case)
        if ours and theirs:
            parts.append(f"{case} {ours:.1f} vs {theirs:.1f} tok/s = **{ours / theirs:.2f}x**")
    if not parts:
        return ""
    return "graphprune's dense float32 generation file vs onnxruntime-genai's float32 file of the same weights: " + "; ".join(parts) + "."


def markdown(data: dict[str, Any], result: Any, model: str) -> str:
    prov, machine, load = data["provenance"], data["machine"], data["load_average"]
    lines = [
        f"# Deployment in onnxruntime: int8 on top of pruning, and the peers' files ({model})",
        "",
        f"Generated by `{prov['command']}` at commit {prov['commit']} ({prov['date']}). Machine: {machine['cpu']}, "
        f"{machine['usable_cores']} usable cores, onnxruntime {machine['onnxruntime']} (CPUExecutionProvider, spin-waiting "
        f"off). Load average (1, 5, 15 min) {load['start']} at the start of the timing, {load['end']} at its end. {data['load_note']}",
        "",
        "## int8 on top of pruning",
        "",
        "Perplexity per docs/PROTOCOL.md through the logits file in onnxruntime; decode: 64 tokens after a 128-token "
        "prompt with the KV cache, median tokens per second of the generation file (batch 1 and 8); ttft: a 128-token "
        "prompt to the first token, paired speedup vs graphprune's dense float32 file, median [IQR]. int8 = onnxruntime `quantize_dynamic`, per-channel symmetric int8 weights of every "
        "MatMul with a constant weight (LM head included) except the MLP down projections, which stay float32; uint8 "
        "activations quantized at run time. Smallest logits "
        "file: int8 with sparse initializers for pruned models.",
        "",
        data["tables"]["int8"],
        "## graphprune's files and the peers', side by side",
        "",
        data["tables"]["acceptance"],
        "",
        data["tables"]["peers"],
        f"Speedup = {BASELINE} time / file time, paired per repeat, median [interquartile range]; > 1 is faster than "
        "graphprune's dense float32 file. Decode cells give tokens per second.",
        "",
        summary_table(result),
        "| file | size | greedy tokens equal to eager PyTorch (of 32, batch 1) | operators |",
        "|---|---:|---:|---|",
    ]
    for name, f in data["files"].items():
        agree = data["peers"].get(name, {}).get("greedy_agreement_32", f.get("greedy_agreement_32"))
        lines.append(f"| {name} | {mib(f['bytes'])} | {'-' if agree is None else agree} | {f['ops']} |")
    lines += [
        "",
        f"Optimum (ONNX export with past): {data['peers']['optimum']}",
        "",
        "## All records",
        "",
        to_markdown(result),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
