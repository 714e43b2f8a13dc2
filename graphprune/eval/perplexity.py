"""Perplexity per the protocol: exp(mean token NLL) over non-overlapping windows, float32."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from graphprune.distributed import Dist

MIB = 1024 * 1024
_NLL_ROWS = 256  # positions per cross-entropy call: its log-softmax transient is rows x vocab


def _nll_sum(logits: Tensor, ids: Tensor) -> float:
    """Summed next-token NLL of ``ids [b, L]`` under ``logits [b, L, vocab]``, a window and
    ``_NLL_ROWS`` positions at a time (no reshaped copy or log-softmax of the whole batch)."""
    total = 0.0
    last = ids.shape[1] - 1
    for b in range(ids.shape[0]):
        for start in range(0, last, _NLL_ROWS):
            end = min(start + _NLL_ROWS, last)
            total += float(F.cross_entropy(logits[b, start:end].float(), ids[b, start + 1:end + 1], reduction="sum"))
    return total


@torch.no_grad()
def perplexity(
    logits_fn: Callable[[Tensor], Tensor],
    windows: Tensor,
    batch_size: int = 4,
    progress: bool = False,
    max_logits_mib: float = 128.0,
) -> dict[str, float]:
    """Perplexity of a causal LM on ``windows [n, L]`` of token ids.

    Each window predicts its own tokens 2..L from the previous ones (no context carried
    across windows), so ``n·(L-1)`` tokens are scored.

    Args:
        logits_fn: ``ids [b, L] -> logits [b, L, vocab]`` (a GraphModel or a wrapped HF model).
        windows: evaluation windows from :meth:`graphprune.data.TokenSplits.eval_windows`.
        batch_size: at most this many windows per forward pass.
        progress: show a progress bar.
        max_logits_mib: fewer windows go into a forward when their float32 logits would exceed
            this (a 49k vocabulary makes 96 MiB of logits per 512-token window, so the default
            model scores one window per forward: evaluation is then no longer the peak of a
            prune's memory, and a forward of 512 tokens already keeps the matmuls efficient);
            the first forward takes one window to learn the vocabulary size.

    Returns:
        ``{"ppl", "nll", "tokens", "seconds"}``.
    """
    t0 = time.perf_counter()
    total = 0.0
    count = 0
    n, length = int(windows.shape[0]), int(windows.shape[1])
    per, done = 1, 0
    with tqdm(total=n, desc="perplexity", unit="window", disable=not progress, leave=False) as bar:
        while done < n:
            ids = windows[done:done + per]
            logits = logits_fn(ids)
            total += _nll_sum(logits, ids)
            count += ids[:, 1:].numel()
            done += int(ids.shape[0])
            bar.update(int(ids.shape[0]))
            per = max(1, min(batch_size, int(max_logits_mib * MIB // max(length * logits.shape[-1] * 4, 1))))
            del logits
    mean = total / max(count, 1)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "seconds": time.perf_counter() - t0}


def sharded_perplexity(logits_fn: Callable[[Tensor], Tensor], windows: Tensor, dist: Dist, progress: bool = False) -> dict[str, Any]:
    """Protocol perplexity with the windows split across ranks and the NLL sums reduced."""
    if not dist.active:
        return perplexity(logits_fn, windows, batch_size=4, progress=progress)
    lo, hi = dist.bounds(int(windows.shape[0]))
    part = perplexity(logits_fn, windows[lo:hi], batch_size=4, progress=progress) if hi > lo else {"nll": 0.0, "tokens": 0, "seconds": 0.0}
    tokens = dist.all_reduce_float(float(part["tokens"]))
    total = dist.all_reduce_float(part["nll"] * part["tokens"])
    mean = total / max(tokens, 1.0)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": int(tokens), "seconds": part["seconds"]}
