"""Command line: ``graphprune inspect | eval | prune | export | generate | bench | convert | run``.

User errors (any :class:`graphprune.errors.GraphPruneError`) print one clear line and
exit with status 2; no traceback. So do outputs that cannot be written (no space, no
permission: :class:`graphprune.errors.OutputError`, see :mod:`graphprune.fileio`).
``-v`` shows progress details, ``-q`` hides progress bars.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Any, Sequence, cast

from graphprune.errors import ConfigError, GraphPruneError
from graphprune.fileio import WRITE_ERRNOS, os_errno, output_error

log = logging.getLogger("graphprune")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (built-in), tiny-llama, tiny-opt, tiny-<family>, a HF folder or a .gguf file")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")


def _add_text(p: argparse.ArgumentParser, evaluating: bool = False) -> None:
    if evaluating:
        p.add_argument("--text", nargs="*", default=(), metavar="FILE|NAME",
                       help="texts to evaluate on: UTF-8 files or built-in names (pydoc, news); default: pydoc and news")
        return
    p.add_argument("--text", nargs="*", default=(), metavar="FILE|NAME",
                   help="calibration texts: UTF-8 files or built-in names (pydoc, news); default: pydoc (the protocol text)")
    p.add_argument("--text-weights", nargs="*", type=float, default=(), metavar="W",
                   help="share of the calibration segments drawn from each --text entry (default: equal shares)")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log details")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(prog="graphprune", description="One-shot pruning of language models through a graph compiler.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", parents=[common], help="capture a model and summarise its graph")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("eval", parents=[common], help="perplexity per the protocol (of a model, or of an exported .onnx / .pt file)")
    _add_model(p)
    _add_text(p, evaluating=True)
    p.add_argument("--eval-len", type=int, default=512, help="window length (default 512)")
    p.add_argument("--eval-windows", type=int, default=None, metavar="N",
                   help="score only the first N windows of each text: a quick check, not the protocol figure (default: every window)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR|MODEL",
        help="for an exported .onnx/.pt file: its tokenizer (default: the file's folder)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("prune", parents=[common], help="calibrate and prune stage by stage, save a model folder")
    _add_model(p)
    _add_text(p)
    p.add_argument("--method", default="sparsegpt", help="magnitude, wanda, sparsegpt, gblm, alps, proximal")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of zeros in [0, 1) (unstructured)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M (N kept of every M), e.g. 2:4")
    p.add_argument("--override", action="append", default=[], metavar="GLOB=VALUE", help="per-layer sparsity, N:M or 'skip', e.g. '*.down_proj=0.3'")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="solver option, e.g. blocksize=64")
    p.add_argument("--refine", choices=["none", "masked-gd"], default="none", help="post-step after the solver")
    p.add_argument("--refine-steps", type=int, default=0)
    p.add_argument("--layer-errors", action="store_true",
                   help="report each Linear's reconstruction error also for magnitude/wanda/gblm (accumulates XᵀX, which they do not need)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument(
        "--calib-dtype", choices=["float32", "bfloat16"], default="float32",
        help="dtype of the calibration forwards (bfloat16: autocast, faster on CPUs with AVX-512 BF16 or AMX; statistics and solvers stay float32/float64)",
    )
    p.add_argument("--eval", action="store_true", help="also report perplexity per the protocol")
    p.add_argument("--eval-len", type=int, default=512, help="perplexity window length (default 512)")
    p.add_argument("--eval-text", nargs="*", default=(), metavar="FILE|NAME",
                   help="texts --eval scores (default: the --text files, else pydoc and news)")
    p.add_argument("--eval-windows", type=int, default=None, metavar="N",
                   help="--eval scores only the first N windows of each text: a quick check, not the protocol figure (default: every window)")
    p.add_argument("--out", default=None, help="output model folder (default out/<model>-<method>-<sparsity>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same job from its checkpoint")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="checkpoint folder (default <out>.ckpt)")
    p.add_argument(
        "--rotate", choices=["pca", "hadamard", "learned"], default=None,
        help="rotate the residual stream first (norms folded), then prune in the rotated space",
    )
    p.add_argument(
        "--rotate-option", action="append", default=[], metavar="KEY=VALUE",
        help="learned rotation: init, steps, lr, momentum, blocks_per_step, holdout, check_every, patience",
    )
    p.add_argument("--slice", type=float, default=0.0, metavar="FRACTION", help="drop this fraction of the rotated stream (SliceGPT; implies --rotate pca)")
    p.add_argument(
        "--structured", type=float, default=0.0, metavar="FRACTION",
        help="remove this fraction of the decoder blocks' parameters as whole MLP channels (and attention heads with "
        "--structured-units), with reconstruction (alone, or with --sparsity/--pattern for what remains)",
    )
    p.add_argument(
        "--structured-method", default="obs", choices=["obs", "obs-swap", "wanda-sp", "flap"],
        help="structured solver: obs (structured OBS, default), obs-swap (+ exchange local search), wanda-sp, flap",
    )
    p.add_argument(
        "--structured-budget", default="uniform", choices=["uniform", "adaptive"],
        help="uniform: the same MLP width in every block (loads in transformers); adaptive: per-block widths under one "
        "global budget (loads through graphprune)",
    )
    p.add_argument(
        "--structured-units", default="mlp", choices=["mlp", "heads", "kv-groups", "mlp+heads", "mlp+kv-groups"],
        help="what --structured removes: mlp (MLP channels, default), heads (query heads, the same number from every KV "
        "group), kv-groups (whole KV groups), or the MLP and heads together (mlp+heads, mlp+kv-groups)",
    )
    p.add_argument(
        "--lazy", action="store_true",
        help="stream a model folder: load one block at a time from its safetensors and write each pruned block as it "
        "finishes (peak memory ~ one block; works under torchrun)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("export", parents=[common], help="export a model folder to ONNX or TorchScript, check parity")
    p.add_argument("model", metavar="DIR", help="model folder (or a built-in model name / .gguf file)")
    p.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    p.add_argument("--out", required=True, metavar="PATH", help="the .onnx / .pt file to write (a folder with --for generation)")
    p.add_argument(
        "--for", dest="purpose", choices=["logits", "generation"], default="logits",
        help="logits: input_ids -> logits of every position (default); generation: a folder with a KV-cache model "
        "(last-position logits), its tokenizer and generation.json, for `graphprune generate` and decode benchmarks",
    )
    p.add_argument("--check-tokens", type=int, default=32, help="--for generation: greedy tokens the file must reproduce (0: no check)")
    p.add_argument("--sparse-initializers", action="store_true", help="ONNX: store mostly-zero weights compactly")
    p.add_argument(
        "--quantize", choices=["int8"], default=None,
        help="ONNX: int8 weights (onnxruntime dynamic quantization, per-channel), checked against the float32 file",
    )
    p.add_argument("--atol", type=float, default=1e-3, help="largest accepted |logits difference| vs PyTorch (default 1e-3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("generate", parents=[common], help="generate text from a model or a generation export")
    p.add_argument("--model", default=None, help="model folder, built-in name, .gguf file or generation export folder (default smollm2-135m)")
    p.add_argument("--prompt", action="append", required=True, help="the prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--runtime", choices=["eager", "torchscript", "onnxruntime", "compile"], default="eager",
        help="where a model runs (an export runs in its own format's runtime); torchscript/onnxruntime export it first; "
        "compile runs the decode steps compiled by torch.compile (minutes to compile on the first run)",
    )
    p.add_argument(
        "--kernels", choices=["auto", "measure", "off"], default="off",
        help="graphprune's kernels in eager/compile: auto = the folder's saved choice (graphprune_kernels.json) "
        "when measured on this machine, else measured now (minutes for the default model); measure; off = torch's dense matmul (default)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: unchanged)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("bench", parents=[common], help="latency of models side by side (first = baseline)")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="model folders (or built-in names); the first is the baseline")
    p.add_argument(
        "--runtimes", nargs="+", default=["eager", "torchscript", "onnxruntime"],
        help="eager, torchscript, onnxruntime, compile (torch.compile: ttft and decode cases only)",
    )
    p.add_argument(
        "--kernels", choices=["auto", "measure", "off"], default="off",
        help="graphprune's kernels (eager, compile, torchscript): auto = a folder's saved choice when measured on this "
        "machine, else measured now (minutes for the default model); measure; off = torch's dense matmul (default). "
        "ONNX files always hold dense weights",
    )
    p.add_argument(
        "--cases", nargs="+", default=["prefill", "ttft", "decode"],
        help="prefill (1x128), ttft (time to first token after 128 and 512 tokens), decode (64 tokens after 128 with "
        "the KV cache, batch 1 and 8), step-nocache (1 token, no cache), throughput (8x512), or NAME=BxS (default: prefill ttft decode)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model, runtime and case")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before them")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: unchanged)")
    p.add_argument("--names", nargs="+", default=[], help="labels for the targets (default: folder names)")
    p.add_argument("--out", default="out/bench", metavar="DIR", help="folder for latency.md, latency.json, latency.png")
    p.add_argument(
        "--generation", action="append", default=[], metavar="NAME=DIR",
        help="time this generation export (graphprune export --for generation) for target NAME in its format's runtime "
        "(ttft and decode cases) instead of exporting one; repeatable",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("convert", parents=[common], help="write a model (GGUF, built-in) as a float32 safetensors model folder")
    _add_model(p)
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")

    p = sub.add_parser("run", parents=[common], help="run a YAML recipe: prune, evaluate, export, bench")
    p.add_argument("recipe", metavar="RECIPE", help="recipe file (see docs/RECIPES.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. prune.sparsity=0.6")
    p.add_argument("--out", default=None, help="output folder (overrides output.dir)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same recipe from its checkpoint")
    p.add_argument("--check", action="store_true", help="validate and print the recipe with its defaults; run nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _kv(items: Sequence[str], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r} must look like KEY=VALUE.")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def _cmd_inspect(args: argparse.Namespace) -> int:
    from graphprune.graph.model import GraphModel
    from graphprune.models import load_model

    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    summary = GraphModel.capture(loaded.model, name=loaded.name).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"model {summary['model']}: {summary['parameters']:,} parameters, {summary['nodes']} graph nodes")
    print("  ops: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["ops"].items())))
    print(f"  embedding: {summary['embedding']}   lm head: {summary['lm_head']}")
    print(f"  {len(summary['blocks'])} blocks, {summary['linears']} Linears ({summary['block_linears']} in blocks), {len(summary['norms'])} norms")
    print("  Linears grouped by shared input:")
    for g in summary["linear_groups"]:
        print(f"    {g['input']:>16} [{g['in_features']}] -> {', '.join(g['linears'])}")
    if summary["experts"]:
        print("  batched expert weights (each expert pruned as a Linear of its own):")
        for e in summary["experts"]:
            print(f"    {e['weight']}: {e['experts']} experts of [{e['shape'][0]}, {e['shape'][1]}]")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from graphprune.pipeline import EvalJob, run_eval

    job = EvalJob(args.model, args.text, args.eval_len, args.batch_size, args.trust_remote_code, tokenizer=args.tokenizer,
                  eval_windows=args.eval_windows)
    res = run_eval(job, progress=not args.quiet)
    if not _is_main():
        return 0  # rank 0 reports
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        texts = "; ".join(f"{name} {r['ppl']:.3f} over {r['tokens']} tokens{_partial(r)}" for name, r in res["texts"].items())
        print(f"{res['model']}: perplexity {texts} ({res['seconds']:.1f}s)")
    return 0


def _partial(text_result: dict[str, Any]) -> str:
    """The caveat after a perplexity that scored only the first windows of its text (``--eval-windows``)."""
    shown, total = text_result.get("windows"), text_result.get("windows_total")
    if shown is None or total is None or shown >= total:
        return ""
    return f" (first {shown} of {total} windows: not the protocol figure)"


def _is_main() -> bool:
    from graphprune.distributed import current

    return current().is_main


def _cmd_prune(args: argparse.Namespace) -> int:
    from graphprune.pipeline import PruneJob, run_prune

    if args.refine != "none" and args.refine_steps <= 0:
        args.refine_steps = 20
    job = PruneJob(
        model=args.model,
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        overrides=_kv(args.override, "--override"),
        options=_kv(args.option, "--option"),
        refine_steps=args.refine_steps if args.refine != "none" else 0,
        layer_errors=args.layer_errors,
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
        seed=args.seed,
        batch_size=args.batch_size,
        calib_dtype=args.calib_dtype,
        text=args.text,
        text_weights=args.text_weights,
        overwrite=args.overwrite,
        evaluate=args.eval,
        eval_len=args.eval_len,
        eval_text=args.eval_text,
        eval_windows=args.eval_windows,
        trust_remote_code=args.trust_remote_code,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        rotation=args.rotate,
        slicing=args.slice,
        structured=args.structured,
        structured_method=args.structured_method,
        structured_budget=args.structured_budget,
        structured_units=args.structured_units,
        rotation_options=_kv(args.rotate_option, "--rotate-option"),
        lazy=args.lazy,
    )
    job.rotation_source()  # validate before loading anything
    job.check_structured()
    if job.prunes():
        job.spec()
    job.out = args.out or str(job.default_out_dir())
    outcome = run_prune(job, progress=not args.quiet)
    rep = outcome.report
    if _report_json(args, rep):
        return 0
    print(f"{_summary(rep)}; prune {rep['prune_seconds']:.1f}s, peak RSS {rep['peak_rss_mb']:.0f} MiB; wrote {job.out}")
    if "rotation" in rep:
        sl = rep.get("slicing")
        width = f", stream {sl['width']} -> {sl['sliced_width']}" if sl else ""
        print(f"  rotation {rep['rotation']['source']}{width}; parameters {rep['parameters_before']:,} -> {rep['parameters_after']:,}")
    st = rep.get("structured")
    if st:
        mlp = [e for e in st["layers"] if e.get("kind", "mlp") == "mlp"]
        heads = [e for e in st["layers"] if e.get("kind") == "heads"]
        parts = []
        if mlp:
            parts.append(f"MLP width {mlp[0]['width']} -> {', '.join(map(str, sorted({e['kept'] for e in mlp})))}")
        if heads:
            kept = sorted({(len(e["kept_heads"]), len(e["kept_kv_heads"])) for e in heads})
            parts.append(f"heads {heads[0]['heads']}/{heads[0]['kv_heads']} -> {', '.join(f'{q}/{k}' for q, k in kept)} (query/KV)")
        print(
            f"  structured {st['method']}: {st['block_parameters_removed']:.1%} of block parameters removed ({'; '.join(parts)}); "
            f"parameters {rep['parameters_before']:,} -> {rep['parameters_after']:,}"
        )
    return 0


def _report_json(args: argparse.Namespace, rep: dict[str, Any]) -> bool:
    """True when nothing more is to be printed: another rank reports, or ``--json`` printed the report."""
    if not _is_main():
        return True  # rank 0 reports
    if args.json:
        print(json.dumps({k: v for k, v in rep.items() if k != "layers"}, indent=2, default=str))
        return True
    return False


def _summary(rep: dict[str, Any]) -> str:
    if "eval" in rep:
        ppl = ", perplexity " + ", ".join(f"{name} {r['ppl']:.3f}{_partial(r)}" for name, r in rep["eval"].items())
    else:
        ppl = f", perplexity {rep['ppl']:.3f}" if "ppl" in rep else ""
    return f"{rep['model']}: {rep['method']} {rep['pattern']} -> sparsity {rep['achieved_sparsity']:.4f}{ppl}"


def _quiet_onnx_exporter(args: argparse.Namespace) -> None:
    # torch's ONNX exporter warns about optional packages (torchvision) on every export;
    # its logging is set up when torch is imported, so this runs after that import.
    if not args.verbose:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _cmd_export(args: argparse.Namespace) -> int:
    from graphprune.pipeline import ExportJob, run_export
    from graphprune.pipeline.export_bench import export_line

    _quiet_onnx_exporter(args)
    job = ExportJob(
        args.model, args.format, args.out, args.sparse_initializers, args.overwrite, args.trust_remote_code, args.atol,
        purpose=args.purpose, check_tokens=args.check_tokens, quantize=args.quantize,
    )
    res = run_export(job)
    print(json.dumps(res, indent=2) if args.json else export_line(res))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from graphprune.models import DEFAULT_MODEL
    from graphprune.pipeline import GenerateJob, run_generate

    _quiet_onnx_exporter(args)
    job = GenerateJob(
        args.model or DEFAULT_MODEL, list(args.prompt), args.max_new_tokens, args.runtime, args.temperature, args.top_k,
        args.seed, args.threads, args.trust_remote_code, args.kernels,
    )
    res = run_generate(job, progress=not args.quiet)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for prompt, text in zip(res["prompts"], res["texts"], strict=True):
        print(prompt + text)
    print(
        f"{res['model']} ({res['runtime']}, {res['sampling']}): {res['new_tokens']} new tokens, first token after "
        f"{res['ttft_ms']:.0f} ms, then {res['tokens_per_s']:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from graphprune.pipeline import BenchJob, run_bench

    _quiet_onnx_exporter(args)
    job = BenchJob(
        args.targets, args.runtimes, args.cases, repeats=args.repeats, warmup=args.warmup, out=args.out,
        threads=args.threads, names=args.names, trust_remote_code=args.trust_remote_code,
        generation={k: str(v) for k, v in _kv(args.generation, "--generation").items()}, kernels=args.kernels,
    )
    res = run_bench(job, progress=not args.quiet)
    res.pop("result")
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(res["table"] + "\n".join(f"wrote {f}" for f in res["files"].values()))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from graphprune.exporters.hf import atomic_dir
    from graphprune.models import load_model

    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    with atomic_dir(args.out, args.overwrite) as tmp:
        cast(Any, loaded.model).save_pretrained(tmp, safe_serialization=True, max_shard_size=args.max_shard_size)
        if hasattr(loaded.tokenizer, "save_pretrained"):
            loaded.tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"{loaded.name}: {params:,} parameters written to {args.out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from graphprune.pipeline.steps import run_pipeline
    from graphprune.recipes.recipe import Recipe, parse_settings

    _quiet_onnx_exporter(args)
    settings = parse_settings(args.set)
    if args.out is not None:
        settings["output.dir"] = args.out
    if args.overwrite:
        settings["output.overwrite"] = True
    recipe = Recipe.load(args.recipe, settings)
    if args.check:
        print(recipe.to_yaml(), end="")
        return 0
    job = recipe.to_pipeline()
    job.prune.resume = args.resume
    outcome = run_pipeline(job, progress=not args.quiet)
    rep = outcome.report
    if not _report_json(args, rep):
        steps = "".join(f"; {name} done" for name in rep.get("steps", {}))
        print(f"{_summary(rep)}{steps}; wrote {rep['out']}")
    return 0


DISTRIBUTED_COMMANDS = ("prune", "run", "eval")
COMMANDS = {
    "convert": _cmd_convert, "inspect": _cmd_inspect, "eval": _cmd_eval, "prune": _cmd_prune,
    "export": _cmd_export, "generate": _cmd_generate, "bench": _cmd_bench, "run": _cmd_run,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quiet:
        # also silences progress bars of libraries (e.g. the GGUF loader); read when tqdm is imported
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)  # also when a host already configured logging
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        # torch's pytree deprecation, raised when a captured graph (its input spec) is copied
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    from graphprune import distributed

    # under torchrun (WORLD_SIZE > 1) every process joins the group; rank 0 prints and writes
    dist = distributed.init_from_env() if args.command in DISTRIBUTED_COMMANDS else distributed.current()
    if not dist.is_main and not args.verbose:
        os.environ["TQDM_DISABLE"] = "1"
        logging.getLogger().setLevel(logging.ERROR)
    ok = False
    try:
        code = COMMANDS[args.command](args)
        ok = True
        return code
    except GraphPruneError as exc:
        print(f"graphprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; finished stages are checkpointed: rerun with --resume to continue" if args.command in ("prune", "run") else ""
        print(f"graphprune {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:
        # a full disk that reached here past graphprune's writers (graphprune.fileio, which also
        # report missing permissions): still one line; anything else is a bug and keeps its traceback
        err = output_error(exc) if os_errno(exc) in WRITE_ERRNOS else None
        if err is None:
            raise
        print(f"graphprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(barrier=ok)


if __name__ == "__main__":
    sys.exit(main())
