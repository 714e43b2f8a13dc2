"""GradientStatsPass: per-weight gradient statistics of the language-modelling loss (GBLM-Pruner).

For every calibration sequence, one forward and backward pass of the *dense* model through
the captured graph gives the gradient ``g_n`` of the mean next-token loss with respect to
each observed block Linear weight (each expert's slice of a batched expert weight too); the pass accumulates ``Σ_n g_n²`` in float32 (the
solver takes the square root: the per-weight ℓ2 norm of the gradients over samples).

Sequences are processed one at a time, so memory holds one sample's activations plus one
gradient and one accumulator per weight, whatever the number of samples.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphprune.distributed import Dist, current
from graphprune.errors import SolverError
from graphprune.graph.model import GraphModel
from graphprune.passes.infra import Pass, PassContext, PassResult, Prop
from graphprune.passes.observe import select_experts, select_linears

log = logging.getLogger(__name__)

class GradientStatsPass(Pass):
    """Accumulate squared LM-loss gradients of the selected block Linears' weights."""

    name = "gradient_stats"
    establishes = frozenset({Prop.GRADIENTS})
    preserves_function = True  # weights are read, never written
    edits_weights = False

    def __init__(self, include: Iterable[str] = ("*",), exclude: Iterable[str] = (), dist: Dist | None = None) -> None:
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.dist = dist  # None: the current process group; each rank takes a share of the sequences

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        tokens = ctx.calibration_tokens("the gradient pass", min_len=2)
        linears = select_linears(gm, self.include, self.exclude)
        params = {li.name: gm.get_attr(li.weight) for li in linears}
        experts = select_experts(gm, self.include, self.exclude)
        for e in experts:  # a batched expert parameter's gradient is accumulated whole, split below
            params.setdefault(e.weight, gm.get_attr(e.weight))
        every: list[torch.Tensor] = list(gm.gm.parameters())
        saved = [p.requires_grad for p in every]
        acc = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in params.items()}
        t0 = time.perf_counter()
        try:
            for p in every:
                p.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)
            dist = self.dist or current()
            sequences = dist.shard(list(tokens.split(1)), "calibration sequences", fix="give more --calib-samples or use fewer processes")
            for ids in tqdm(sequences, desc="gradients", unit="seq", disable=not ctx.progress or not dist.is_main, leave=False):
                for p in params.values():
                    p.grad = None
                with torch.enable_grad():
                    logits = gm.gm(ids)
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
                    loss.backward()
                for name, p in params.items():
                    if p.grad is None:
                        raise SolverError(f"{name}: no gradient reached this weight; is it used by the model?")
                    acc[name] += p.grad.detach().float().pow(2)
        finally:
            for p, flag in zip(every, saved):
                p.requires_grad_(flag)
                p.grad = None
        for a in acc.values():  # same order on every rank
            dist.all_reduce_(a)
        for name, a in acc.items():
            if not torch.isfinite(a).all():
                raise SolverError(f"{name}: gradient statistics contain NaN/Inf; the loss overflowed.")
        wholes = {e.weight: acc.pop(e.weight) for e in experts}  # each batched parameter, split per expert
        for e in experts:
            whole = wholes[e.weight]
            acc[e.name] = (whole[e.index] if e.transposed else whole[e.index].T).contiguous()
        gm.state.grad_sq = acc
        return PassResult(gm, modified=False, stats={"linears": len(acc), "samples": int(tokens.shape[0]), "seconds": round(time.perf_counter() - t0, 2)})
