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


@torch.no_grad()
def perplexity(
    logits_fn: Callable[[Tensor], Tensor],
    windows: Tensor,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of a causal LM on ``windows [n, L]`` of token ids.

    Each window predicts its own tokens 2..L from the previous ones (no context carried
    across windows), so ``n·(L-1)`` tokens are scored.

    Args:
        logits_fn: ``ids [b, L] -> logits [b, L, vocab]`` (a GraphModel or a wrapped HF model).
        windows: evaluation windows from :meth:`graphprune.data.TokenSplits.eval_windows`.
        batch_size: windows per forward pass.
        progress: show a progress bar.

    Returns:
        ``{"ppl", "nll", "tokens", "seconds"}``.
    """
    t0 = time.perf_counter()
    total = 0.0
    count = 0
    batches = list(windows.split(batch_size))
    for ids in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        logits = logits_fn(ids).float()
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
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
