"""Command line: ``graphprune inspect | eval | prune``.

User errors (any :class:`graphprune.errors.GraphPruneError`) print one clear line and
exit with status 2; no traceback. ``-v`` shows progress details, ``-q`` hides progress bars.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from graphprune.errors import ConfigError, GraphPruneError

log = logging.getLogger("graphprune")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (built-in), tiny-llama, tiny-opt, a HF folder or a .gguf file")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")


def _add_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", nargs="*", default=(), metavar="FILE", help="UTF-8 text files instead of the built-in text")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log details")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(prog="graphprune", description="One-shot pruning of language models through a graph compiler.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", parents=[common], help="capture a model and summarise its graph")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("eval", parents=[common], help="perplexity per the protocol")
    _add_model(p)
    _add_text(p)
    p.add_argument("--eval-len", type=int, default=512, help="window length (default 512)")
    p.add_argument("--batch-size", type=int, default=4)
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
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--eval", action="store_true", help="also report perplexity per the protocol")
    p.add_argument("--eval-len", type=int, default=512, help="perplexity window length (default 512)")
    p.add_argument("--out", default=None, help="output model folder (default out/<model>-<method>-<sparsity>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
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
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from graphprune.recipes.pipeline import EvalJob, run_eval

    res = run_eval(EvalJob(args.model, args.text, args.eval_len, args.batch_size, args.trust_remote_code), progress=not args.quiet)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['model']}: perplexity {res['ppl']:.3f} over {res['tokens']} tokens ({res['seconds']:.1f}s)")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from graphprune.recipes.pipeline import PruneJob, default_out_dir, run_prune

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
        calib_samples=args.calib_samples,
        calib_len=args.calib_len,
        seed=args.seed,
        batch_size=args.batch_size,
        text=args.text,
        overwrite=args.overwrite,
        evaluate=args.eval,
        eval_len=args.eval_len,
        trust_remote_code=args.trust_remote_code,
    )
    job.spec()  # validate before loading anything
    job.out = args.out or str(default_out_dir(job))
    outcome = run_prune(job, progress=not args.quiet)
    rep = outcome.report
    if args.json:
        print(json.dumps({k: v for k, v in rep.items() if k != "layers"}, indent=2, default=str))
    else:
        ppl = f", perplexity {rep['ppl']:.3f}" if "ppl" in rep else ""
        print(
            f"{rep['model']}: {rep['method']} {rep['pattern']} -> sparsity {rep['achieved_sparsity']:.4f}{ppl}; "
            f"prune {rep['prune_seconds']:.1f}s, peak RSS {rep['peak_rss_mb']:.0f} MiB; wrote {job.out}"
        )
    return 0


COMMANDS = {"inspect": _cmd_inspect, "eval": _cmd_eval, "prune": _cmd_prune}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quiet:
        # also silences progress bars of libraries (e.g. the GGUF loader); read when tqdm is imported
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except GraphPruneError as exc:
        print(f"graphprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"graphprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
