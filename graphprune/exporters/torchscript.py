"""Export a causal LM to TorchScript (``input_ids -> logits``) by tracing, checked in a fresh process.

The model is wrapped as :class:`~graphprune.exporters.common.LogitsOnly` and traced with
``torch.jit.trace``. Kernels whose storage TorchScript can save (dense, CSR, BSR) stay
as they are, so the file keeps the sparse weights; the others (2:4 semi-structured
tensor subclasses) are lowered to dense ``nn.Linear`` while tracing. Batch and
sequence length stay dynamic: the tracer records sizes as graph values. A custom
``torch.autograd.Function`` in the model (BLOOM's GeLU) would be recorded as an opaque
Python call that a TorchScript file cannot hold; while tracing (no gradients) its
``forward`` runs inline instead, so the trace records the tensor operations it performs.

The check runs ``torch.jit.load`` in a *fresh* Python process (``sys.executable``) that
imports nothing but torch, so the file is proven self-contained, and compares its
logits with the PyTorch model on two probe batches of different shapes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.errors import ExportError
from graphprune.exporters.common import ExportReport, LogitsOnly, check_diff, eval_mode, example_inputs, probe_inputs, reference_logits, require_cpu
from graphprune.fileio import publish, staging_dir
from graphprune.kernels import kernels_lowered

# Runs in the fresh interpreter: load, run every probe, print one JSON line.
_CHECK_SCRIPT = """
import json, sys, torch
module = torch.jit.load(sys.argv[1], map_location="cpu")
probe = torch.load(sys.argv[2], weights_only=True)
diffs = []
with torch.no_grad():
    for ids, ref in zip(probe["inputs"], probe["expected"]):
        out = module(ids).float()
        if tuple(out.shape) != tuple(ref.shape):
            raise SystemExit(f"shape {tuple(out.shape)} != expected {tuple(ref.shape)}")
        diffs.append((out - ref).abs().max().item())
print(json.dumps({"diffs": diffs}))
"""


class _ForwardOnlyContext:
    """The ``ctx`` a custom autograd Function's ``forward`` gets when no backward will run:
    what it saves for the backward is dropped."""

    needs_input_grad: tuple[bool, ...] = ()
    saved_tensors: tuple[Tensor, ...] = ()

    def save_for_backward(self, *tensors: Any) -> None:
        pass

    def mark_dirty(self, *tensors: Any) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


@contextmanager
def autograd_functions_inlined() -> Iterator[None]:
    """While gradients are off, ``Function.apply`` of every custom autograd Function runs
    its ``forward`` directly (with a context that keeps nothing), so a trace sees the
    tensor operations, not an opaque Python call. With gradients on nothing changes."""
    base = torch.autograd.Function
    original = base.__dict__["apply"]

    def apply(cls: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return original.__func__(cls, *args, **kwargs)
        # the newer style defines setup_context and a forward without ctx
        own_setup = any("setup_context" in vars(k) for k in cls.__mro__ if not k.__module__.startswith("torch."))
        if own_setup:
            return cls.forward(*args, **kwargs)
        return cls.forward(_ForwardOnlyContext(), *args, **kwargs)

    base.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        base.apply = original  # type: ignore[method-assign]


def trace_logits(model: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``LogitsOnly(model)`` (untraceable kernels lowered and custom
    autograd Functions inlined while tracing)."""
    with eval_mode(model), torch.no_grad(), kernels_lowered(model, only_untraceable=True) as lowered, autograd_functions_inlined():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # jit.trace deprecation and TracerWarnings
                traced: torch.jit.ScriptModule = torch.jit.trace(  # type: ignore[no-untyped-call]
                    LogitsOnly(lowered), (example,), check_trace=False
                )
        except Exception as exc:  # the tracer raises RuntimeError/TypeError/... for unsupported code
            raise ExportError(
                f"torch.jit.trace failed for {type(model).__name__}: {type(exc).__name__}: {exc}"
            ) from exc
    return traced


def check_in_fresh_process(path: Path, inputs: list[Tensor], expected: list[Tensor], timeout: float = 600) -> float:
    """Max |logits difference| of ``torch.jit.load(path)`` in a new interpreter vs ``expected``."""
    probe = path.with_name(path.name + ".probe.pt")
    try:
        # serialised in memory, then written by Python: torch.save straight to a file reports a
        # full disk as a meaningless RuntimeError, a Python write as OSError(ENOSPC)
        buffer = io.BytesIO()
        torch.save({"inputs": inputs, "expected": expected}, buffer)
        probe.write_bytes(buffer.getvalue())
        proc = subprocess.run(
            [sys.executable, "-c", _CHECK_SCRIPT, str(path), str(probe)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise ExportError(f"loading the TorchScript file in a fresh process took over {timeout:.0f} s.") from exc
    finally:
        probe.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ExportError(f"the TorchScript file does not load or run in a fresh Python process:\n{tail}")
    try:
        diffs = json.loads(proc.stdout.strip().splitlines()[-1])["diffs"]
    except (ValueError, IndexError, KeyError) as exc:
        raise ExportError(f"unexpected output from the TorchScript check process: {proc.stdout[-500:]!r}") from exc
    return max(float(d) for d in diffs)


def export_torchscript(
    model: nn.Module,
    path: str | Path,
    *,
    example_tokens: Tensor | None = None,
    check: bool = True,
    atol: float = 1e-4,
) -> ExportReport:
    """Trace ``model`` to a TorchScript file ``input_ids [batch, seq] -> logits``.

    Args:
        model: an HF causal LM (or a module mapping token ids to logits), kernels allowed.
        path: the ``.pt`` file to write (replaced atomically if it exists).
        example_tokens: ``[batch, seq]`` ids to trace with (batch, seq >= 2); default a
            seeded ``[2, 16]`` batch.
        check: load the file in a fresh process and compare with PyTorch on two probe batches.
        atol: largest accepted absolute logits difference.

    Returns:
        An :class:`ExportReport` (``sparse_initializers`` is 0 for TorchScript).

    Raises:
        ExportError: tracing, loading or the numerical comparison failed.
    """
    start = time.perf_counter()
    final = Path(path)
    require_cpu(model)
    with eval_mode(model), torch.no_grad():
        example = example_inputs(model, example_tokens)
        probes = probe_inputs(example, model)
        expected = reference_logits(model, probes) if check else []
    traced = trace_logits(model, example)

    with staging_dir(final) as stage:
        staged = stage / final.name
        try:
            # through a Python file object: torch.jit saving to a path aborts the whole process
            # (C++ terminate) on a full disk; this way a failed write is an OSError
            with open(staged, "wb") as handle:
                torch.jit.save(traced, handle)
        except OSError:
            raise  # no space, no permission: staging_dir reports it as an OutputError
        except Exception as exc:  # e.g. a tensor subclass TorchScript cannot serialise
            raise ExportError(f"could not save the traced module: {type(exc).__name__}: {exc}") from exc
        diff = None
        shapes = [(int(p.shape[0]), int(p.shape[1])) for p in probes]
        if check:
            diff = check_in_fresh_process(staged, probes, expected)
            check_diff(diff, atol, "TorchScript", shapes)
        (placed,) = publish([staged], final.parent)
    return ExportReport(
        path=final,
        format="torchscript",
        bytes=placed.stat().st_size,
        max_abs_diff=diff,
        seconds=time.perf_counter() - start,
        probe_shapes=shapes,
    )
