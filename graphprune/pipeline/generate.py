"""``graphprune generate``: prompt in, text out, from a model or a generation export.

    from graphprune.pipeline import GenerateJob, run_generate

    res = run_generate(GenerateJob(model="out/smollm2-gen-onnx", prompts=["def fib(n):"], max_new_tokens=48))
    print(res["texts"][0], res["tokens_per_s"])

The model is a generation export folder (``graphprune export --for generation``: its file
runs in the runtime of its format), or anything ``load_model`` takes (a model folder, a
built-in name, a GGUF file), run in eager PyTorch or, with ``runtime`` ``torchscript`` /
``onnxruntime``, exported to a temporary generation folder first (checked on 8 greedy tokens).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch

from graphprune.errors import ConfigError
from graphprune.exporters.generation import DESCRIPTION, export_generation, read_description
from graphprune.exporters.runners import CompiledRunner, EagerRunner, Runner, generate, left_padded, load_runner
from graphprune.kernels.regime import kernels_for
from graphprune.models import load_model
from graphprune.models.loader import load_tokenizer
from graphprune.pipeline.jobs import GenerateJob

log = logging.getLogger(__name__)
FORMAT_RUNTIME = {"onnx": "onnxruntime", "torchscript": "torchscript"}
#: greedy tokens checked when a model is exported on the fly for another runtime
ON_THE_FLY_CHECK = 8


def run_generate(job: GenerateJob, progress: bool = True) -> dict[str, Any]:
    """Generate ``job.max_new_tokens`` tokens after each prompt (one left-padded batch)."""
    job.validate()
    t0 = time.perf_counter()
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    with tempfile.TemporaryDirectory(prefix="graphprune-gen-") as tmp:
        runner, tokenizer, name, runtime = _open(job, Path(tmp))
        prompts = [list(tokenizer.encode(p)) for p in job.prompts]
        if any(not p for p in prompts):
            raise ConfigError("a prompt encodes to no tokens; give some text.")
        eos = runner.layout.eos_token_ids
        pad = getattr(tokenizer, "pad_token_id", None)
        ids, mask = left_padded(prompts, pad_id=int(pad if pad is not None else (eos[0] if eos else 0)))
        bar = _bar(job.max_new_tokens, progress)
        t_start = time.perf_counter()

        def on_token(step: int, new: torch.Tensor) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{(step + 1) * ids.shape[0] / (time.perf_counter() - t_start):.1f} tok/s")

        result = generate(
            runner, ids, mask, max_new_tokens=job.max_new_tokens, temperature=job.temperature, top_k=job.top_k,
            seed=job.seed, on_token=on_token,
        )
        if bar is not None:
            bar.close()
    texts = []
    for row in result.tokens.tolist():
        if eos:
            row = row[: next((i for i, t in enumerate(row) if t in eos), len(row))]
        texts.append(tokenizer.decode(row))
    return {
        "model": name,
        "runtime": runtime,
        "prompts": job.prompts,
        "texts": texts,
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": int(result.tokens.shape[1]),
        "ttft_ms": round(result.ttft_s * 1e3, 2),
        "decode_seconds": round(result.decode_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 2),
        "sampling": "greedy" if job.temperature == 0 else f"temperature {job.temperature}, top-k {job.top_k or 'all'}, seed {job.seed}",
        "total_seconds": round(time.perf_counter() - t0, 2),
    }


def _open(job: GenerateJob, tmp: Path) -> tuple[Runner, Any, str, str]:
    """The runner, tokenizer, model name and runtime of ``job``."""
    folder = Path(job.model)
    if (folder / DESCRIPTION).is_file():
        desc = read_description(folder)
        runtime = FORMAT_RUNTIME[desc["format"]]
        if job.runtime not in ("eager", runtime):
            raise ConfigError(f"{folder} is a {desc['format']} export and runs in {runtime}; drop --runtime or give --runtime {runtime}.")
        return load_runner(folder, job.threads), load_tokenizer(folder), folder.name, runtime
    loaded = load_model(job.model, trust_remote_code=job.trust_remote_code)
    if job.runtime in ("eager", "compile"):
        kernels = kernels_for(loaded.model, folder, job.kernels, progress=False)
        log.info("%s: kernels %s (%s)", loaded.name, kernels["choices"] or "all dense", kernels["source"])
        if job.runtime == "compile":
            log.info("compiling the decode step with torch.compile (minutes on the first run) ...")
            return CompiledRunner(loaded.model), loaded.tokenizer, loaded.name, "compile"
        return EagerRunner(loaded.model), loaded.tokenizer, loaded.name, "eager"
    fmt = "onnx" if job.runtime == "onnxruntime" else "torchscript"
    log.info("exporting %s to %s for generation (a temporary file) ...", loaded.name, fmt)
    out = tmp / "export"
    export_generation(loaded.model, out, format=cast(Any, fmt), check_tokens=ON_THE_FLY_CHECK)
    return load_runner(out, job.threads), loaded.tokenizer, loaded.name, job.runtime


def _bar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="tok", file=sys.stderr, leave=False)


__all__ = ["run_generate"]
