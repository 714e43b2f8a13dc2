"""RewriteKernelsPass: run each pruned Linear on the fastest correct kernel for the device.

For every pruned block Linear (the names in ``gm.state.masks``):

1. :func:`graphprune.kernels.select_kernel` builds every applicable kernel (dense, CSR,
   BSR, 2:4 semi-structured) from the real weight, checks it against ``F.linear`` and
   times it on ``x [tokens, in]``. Dense is the default: a sparse kernel is chosen only
   when it is measurably faster, so on a CPU where a 50 %-sparse CSR matmul loses to
   dense nothing is rewritten.
2. When a sparse kernel wins, the graph is rewritten::

       %w = get_attr[lm.model.layers.0.mlp.down_proj.weight]
       %y = call_function[aten.linear](%x, %w, %b)
   ->
       %y = call_module[lm.model.layers.0.mlp.down_proj](%x)

   The ``get_attr`` nodes are erased and the kernel module takes the place of the
   attribute holder at the same path in the ``GraphModule``, so the node keeps the
   Linear's module path and ``nn_module_stack``.
3. The **same** kernel object replaces the ``nn.Linear`` in the Hugging Face model
   (``gm.model``). Graph and model stay one program with one copy of each weight (the
   dense weight is freed): eager runs and the exporters see the kernel, which they
   lower to a dense ``nn.Linear`` for ONNX (``graphprune.exporters.onnx``) and keep as
   it is for TorchScript; ``save_hf_folder`` lowers while saving, so the folder loads
   in ``transformers`` unchanged.

The choice and every candidate's time go to ``gm.state.kernels`` (linear name ->
:class:`~graphprune.kernels.KernelReport` as a dict, plus the graph target) and a
summary to the :class:`PassResult` stats. Running the pass again skips Linears that
were already rewritten.

The timer is injectable (see :func:`~graphprune.kernels.select_kernel`) so tests can
force a choice deterministically.
"""
from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.fx import Node
from tqdm.auto import tqdm

from graphprune.errors import ConfigError
from graphprune.graph.model import GraphModel
from graphprune.graph.queries import LinearInfo
from graphprune.kernels import KernelLinear
from graphprune.kernels.regime import DECODE_TOKENS, PREFILL_TOKENS, choose_regime_kernel, kinds_label
from graphprune.kernels.select import Timer
from graphprune.passes.infra import Pass, PassContext, PassResult, Prop

log = logging.getLogger(__name__)



def _holder_path(li: LinearInfo) -> str:
    """GraphModule path of the module holding the Linear's weight (``lm.model...q_proj``)."""
    if not li.weight.endswith(".weight"):
        raise ConfigError(f"{li.name}: weight attribute {li.weight!r} does not end in '.weight'; cannot place a kernel.")
    return li.weight[: -len(".weight")]


def _split(path: str) -> tuple[str, str]:
    parent, _, child = path.rpartition(".")
    return parent, child


class RewriteKernelsPass(Pass):
    """Replace pruned Linears by the fastest measured kernel (dense stays dense when sparse is slower).

    Args:
        device: where the kernels will run (the model must already be there).
        tokens: rows of the input each Linear is timed on (batch x sequence of the
            deployment case; 128 = the protocol's prefill).
        dtype: compute dtype; default the weight's. It must match the model's dtype
            (cast the model first) because the graph feeds the kernel its own activations.
        candidates: kernel kinds to consider (dense is always included); default all.
        repeats, warmup, min_speedup: passed to :func:`select_kernel`.
        timer: injectable timer (tests); default wall clock median.
        include: only Linears whose name matches one of these globs (default: all pruned).
        confirm: re-measure dense against a winning sparse kernel and rewrite only if it
            wins again (a stall during the dense runs on a busy machine can fake a win).
    """

    name = "rewrite_kernels"
    requires = frozenset({Prop.PRUNED})
    establishes = frozenset({Prop.KERNELS})
    preserves_function = True

    def __init__(
        self,
        device: str | torch.device = "cpu",
        tokens: int | Sequence[int] = DECODE_TOKENS + PREFILL_TOKENS,
        dtype: torch.dtype | None = None,
        candidates: Iterable[str] | None = None,
        *,
        max_decode_tokens: int = max(DECODE_TOKENS),
        repeats: int = 20,
        warmup: int = 3,
        min_speedup: float = 1.05,
        timer: Timer | None = None,
        include: Iterable[str] = ("*",),
        confirm: bool = True,
    ) -> None:
        counts = (tokens,) if isinstance(tokens, int) else tuple(int(t) for t in tokens)
        if not counts or any(t < 1 for t in counts):
            raise ConfigError(f"RewriteKernelsPass needs token counts >= 1, got {tokens}.")
        if max_decode_tokens < 1:
            raise ConfigError(f"RewriteKernelsPass needs max_decode_tokens >= 1, got {max_decode_tokens}.")
        self.device = torch.device(device)
        self.decode_tokens = tuple(sorted({t for t in counts if t <= max_decode_tokens}))
        self.prefill_tokens = tuple(sorted({t for t in counts if t > max_decode_tokens}))
        self.dtype = dtype
        self.candidates = None if candidates is None else tuple(candidates)
        self.repeats = repeats
        self.warmup = warmup
        self.min_speedup = min_speedup
        self.timer = timer
        self.include = tuple(include)
        self.confirm = confirm

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        masks = gm.state.masks
        done = gm.state.kernels
        by_name = {li.name: li for li in gm.linears}
        todo = [
            by_name[name]
            for name in masks
            if name in by_name and any(fnmatch.fnmatchcase(name, p) for p in self.include)
        ]
        choices: Counter[str] = Counter()
        counts = self.decode_tokens + self.prefill_tokens
        seconds_dense = dict.fromkeys(counts, 0.0)
        seconds_chosen = dict.fromkeys(counts, 0.0)
        weights = [gm.get_attr(li.weight) for li in gm.linears]
        working_set = sum(w.numel() * w.element_size() for w in weights)
        for li in tqdm(todo, desc="kernels", unit="linear", disable=not ctx.progress):
            module, entry = self._select(gm, li, working_set)
            entry |= {"choice": kinds_label(entry), "target": None, "rewritten": False}
            lost = [r for r, c in entry.get("confirm", {}).items() if not c["won_again"]]
            if lost:
                entry["kept_dense_because"] = ", ".join(f"{entry['confirm'][r]['kind']} ({r}) did not win again when re-measured" for r in lost)
            if entry["choice"] != "dense":
                reason = self._blocker(gm, li)
                if reason is None:
                    entry["target"] = self._rewrite(gm, li, module)
                    entry["rewritten"] = True
                else:
                    log.warning("%s: keeping dense although %s is faster: %s", li.name, entry["choice"], reason)
                    entry["kept_dense_because"] = reason
                    entry["decode"] = entry["prefill"] = entry["choice"] = "dense"
            done[li.name] = entry
            choices[entry["choice"]] += 1
            for t in counts:
                times = entry["times"][str(t)]
                seconds_dense[t] += times["dense"]
                seconds_chosen[t] += times[entry["decode" if t in self.decode_tokens else "prefill"]]
            log.info("%s %s: %s (%s)", li.name, entry["shape"], entry["choice"], _fmt_times(entry))
        rewritten = sum(1 for li in todo if done[li.name]["rewritten"])
        if rewritten:
            gm.lint()
            gm.invalidate()
        stats = {
            "linears": len(todo),
            "rewritten": rewritten,
            "choices": dict(choices),
            "decode_tokens": list(self.decode_tokens),
            "prefill_tokens": list(self.prefill_tokens),
            "device": str(self.device),
            # per token count, the sum over Linears of the per-Linear medians: the Linears' share of one forward
            "linear_seconds_dense": {str(t): v for t, v in seconds_dense.items()},
            "linear_seconds_chosen": {str(t): v for t, v in seconds_chosen.items()},
        }
        return PassResult(gm, modified=rewritten > 0, stats=stats)

    # ------------------------------------------------------------------ steps
    def _select(self, gm: GraphModel, li: LinearInfo, working_set: int | None = None) -> tuple[KernelLinear, dict[str, Any]]:
        weight = gm.get_attr(li.weight)
        bias = gm.get_attr(li.bias) if li.bias else None
        if weight.device.type != self.device.type:
            raise ConfigError(
                f"{li.name}: the weight is on {weight.device} but kernels are chosen for {self.device}; "
                f"move the model to {self.device} before the pass."
            )
        if self.dtype is not None and self.dtype != weight.dtype:
            raise ConfigError(
                f"{li.name}: the weight is {weight.dtype} but kernels are asked for {self.dtype}; "
                "cast the model to that dtype before capture (the graph feeds kernels its own activations)."
            )
        return choose_regime_kernel(
            weight.detach(),
            None if bias is None else bias.detach(),
            decode_tokens=self.decode_tokens,
            prefill_tokens=self.prefill_tokens,
            candidates=self.candidates,
            repeats=self.repeats,
            warmup=self.warmup,
            min_speedup=self.min_speedup,
            timer=self.timer,
            confirm=self.confirm,
            working_set=working_set,
        )

    def _blocker(self, gm: GraphModel, li: LinearInfo) -> str | None:
        """Why this Linear cannot be rewritten in place (a shared weight, no HF module), or None."""
        for attr in _attr_nodes(li.node):
            others = [u for u in attr.users if u is not li.node]
            if others:
                return f"its parameter {attr.target} is also read by {[u.name for u in others]} (tied weights)"
        holder = gm.gm.get_submodule(_holder_path(li))
        extra = set(holder._parameters) | set(holder._buffers) | set(holder._modules)
        if extra - {"weight", "bias"}:
            return f"module {_holder_path(li)} holds more than a weight and bias ({sorted(extra)})"
        try:
            target = gm.model.get_submodule(li.name)
        except AttributeError:
            return f"the model has no module {li.name}"
        if not isinstance(target, nn.Linear) or target.weight is not gm.get_attr(li.weight):
            return f"the model's {li.name} is not the nn.Linear whose weight the graph reads"
        return None

    def _rewrite(self, gm: GraphModel, li: LinearInfo, kernel: KernelLinear) -> str:
        graph = gm.gm.graph
        node = li.node
        path = _holder_path(li)
        with graph.inserting_before(node):
            call = graph.call_module(path, (li.input,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        attrs = _attr_nodes(node)
        graph.erase_node(node)
        for attr in attrs:
            if not attr.users:
                graph.erase_node(attr)
        # one kernel object in both the graph and the model: one source of truth for the weight
        kernel.requires_grad_(False)
        parent, child = _split(path)
        setattr(gm.gm.get_submodule(parent), child, kernel)
        model_parent, model_child = _split(li.name)
        setattr(gm.model.get_submodule(model_parent), model_child, kernel)
        return path


def _attr_nodes(linear: Node) -> list[Node]:
    """The ``get_attr`` nodes (weight, bias) an ``aten.linear`` node reads."""
    return [a for a in linear.args[1:3] if isinstance(a, Node) and a.op == "get_attr"]


def _fmt_times(entry: dict[str, Any]) -> str:
    return "; ".join(
        f"{t} tokens: " + ", ".join(f"{k} {v * 1e6:.0f}us" for k, v in times.items()) for t, times in entry["times"].items()
    )


def kernel_summary(gm: GraphModel) -> dict[str, Any]:
    """Counts of chosen kernels and the rewritten Linears, from ``gm.state.kernels``."""
    entries = gm.state.kernels
    return {
        "choices": dict(Counter(e["choice"] for e in entries.values())),
        "rewritten": sorted(n for n, e in entries.items() if e["rewritten"]),
    }
