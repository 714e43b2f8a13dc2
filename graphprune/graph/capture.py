"""Capture: trace a causal LM into a torch.fx graph with dynamic batch and sequence.

We capture with ``torch.export.export(..., strict=False)`` and unlift the result
(``ExportedProgram.module()``): a flat ``torch.fx.GraphModule`` of ATen operators whose
weights are ``get_attr`` nodes *sharing storage with the original model's parameters*.
Why torch.export rather than ``torch.fx.symbolic_trace``: transformers 5 no longer ships
its fx tracer and plain symbolic tracing fails on Hugging Face decoder layers, while
non-strict export handles them, keeps ``nn_module_stack`` metadata on every node (which
module a node came from) and gives dynamic shapes. Every Linear becomes one
``aten.linear`` node, which is what the passes rewrite.
"""
from __future__ import annotations

import logging
import os
import time
import traceback

import torch
from torch import Tensor, nn
from torch.export import Dim

from graphprune.errors import CaptureError, ExportError

log = logging.getLogger(__name__)

#: Prefix of every parameter name in the captured graph (the wrapper's attribute).
ROOT = "lm"


class LogitsOnly(nn.Module):
    """``input_ids [batch, seq] -> logits [batch, seq, vocab]`` for a causal LM, no KV cache.

    The one wrapper the capture and the exporters trace. Hugging Face models are called with
    ``use_cache=False`` so the traced graph has one tensor output and no cache plumbing; a
    plain module returning a tensor (or a tuple whose first item is the logits) is accepted
    too. The model sits at attribute :data:`ROOT`, the prefix of every parameter name.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model
        self._hf = hasattr(model, "config") and hasattr(model, "generate")

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.lm(input_ids=input_ids, use_cache=False, return_dict=True) if self._hf else self.lm(input_ids)
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)):
            logits = out[0]
        if not isinstance(logits, Tensor):
            raise ExportError(
                f"{type(self.lm).__name__} returned {type(out).__name__}, not logits; "
                "wrap it in a module returning the logits tensor."
            )
        return logits


def example_tokens(vocab: int, batch: int = 2, seq: int = 16) -> Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


_TORCH_DIR = os.path.dirname(torch.__file__)


def _op_name(fn: object) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return str(fn)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    owner = getattr(fn, "__objclass__", None)
    if owner is not None and issubclass(owner, torch._C.TensorBase):
        return f"Tensor.{name}"
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else name


def _where_it_failed(exc: BaseException, model: nn.Module) -> str:
    """`` in <module path> (<class>), operator <op>, at <file>:<line> `<code>``` from the traceback.

    The module is the innermost frame whose ``self`` is a submodule of ``model`` (its
    ``nn_module_stack`` path), the operator the innermost ``func`` torch was dispatching
    (``Tensor.__bool__``, ``aten.nonzero.default``...), the line the last frame outside torch.
    """
    names = {id(m): n for n, m in model.named_modules()}
    module = op = line = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            module = f"{names[id(owner)] or '<root>'} ({type(owner).__name__})"
        fn = frame.f_locals.get("func")
        if fn is not None and frame.f_code.co_name in ("__torch_function__", "__torch_dispatch__", "proxy_call", "dispatch"):
            op = _op_name(fn)
        if not frame.f_code.co_filename.startswith(_TORCH_DIR):
            summary = traceback.extract_tb(tb, limit=1)[0]
            code = (summary.line or "").strip()
            line = f"{os.path.basename(summary.filename)}:{summary.lineno}" + (f" `{code}`" if code else "")
        tb = tb.tb_next
    parts = [f" in {module}" if module else "", f", operator {op}" if op else "", f", at {line}" if line else ""]
    return "".join(parts)


def capture(model: nn.Module, example: Tensor | None = None) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule computing logits from token ids.

    Args:
        model: a Hugging Face causal LM in eval mode.
        example: example ``input_ids``; a random ``[2, 16]`` batch by default.

    Raises:
        CaptureError: naming the operator or construct that could not be traced.
    """
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 256))
    if example is None:
        example = example_tokens(vocab)
    wrapper = LogitsOnly(model).eval()
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("seq", min=2, max=1 << 16)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, (example,), dynamic_shapes=({0: batch, 1: seq},), strict=False)
    except Exception as exc:  # torch raises many types here; all mean "cannot capture"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"could not capture {type(model).__name__} into a graph{_where_it_failed(exc, model)}: {type(exc).__name__}: {first}. "
            "The model uses an operator or Python construct torch.export cannot trace; "
            "check that it is a standard causal LM and that --trust-remote-code code is export-friendly."
        ) from exc
    gm = program.module()
    log.info("captured %s in %.1fs: %d nodes", type(model).__name__, time.perf_counter() - t0, len(gm.graph.nodes))
    return gm  # type: ignore[return-value]
