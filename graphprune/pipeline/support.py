"""What graphprune can do with each architecture family: one check per (family, capability).

Every check runs the public path a user runs on the family's tiny model
(:mod:`graphprune.models.zoo`) and verifies the result, so a cell passes only when the
capability really works there:

* ``capture``: the graph computes the model's logits (relative difference <= 1e-5);
* solvers (``magnitude``, ``wanda``, ``sparsegpt``, ``gblm``, ``alps``) and ``2:4``: the
  ``graphprune prune`` pipeline at 50 % (SparseGPT for 2:4); every weight matrix of the
  decoder blocks -- whatever module holds it -- is counted, and each must reach the target
  (no silent skips) except MoE routers, which must stay dense; the 2:4 groups are exact, and the saved folder reloads to the pruned
  logits (<= 1e-5);
* rotations (``pca``, ``hadamard``, ``learned``): norm folding and the rotation keep the
  logits (<= 1e-4);
* ``slice``: a PCA rotation sliced by 25 % leaves a narrower stream that still runs;
* ``kernels``: the kernel rewrite of the 50 %-pruned graph keeps its logits (<= 1e-5);
* ``onnx`` and ``torchscript``: the exporters' own parity checks (onnxruntime, a fresh
  process) on the model.

A failing check keeps the error message, which is what the support table shows as the gap.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from graphprune.errors import GraphPruneError

SOLVERS = ("magnitude", "wanda", "sparsegpt", "gblm", "alps")
ROTATIONS = ("pca", "hadamard", "learned")
CAPABILITIES = ("capture", *SOLVERS, "2:4", *ROTATIONS, "slice", "kernels", "onnx", "torchscript")
#: the subset the test suite runs on every family (the benchmark runs all of them)
CORE = ("capture", "wanda", "pca", "onnx")


#: What does not work yet, and why: (family, capability) -> reason. The tests expect exactly
#: these to fail with a clear error; the benchmark flags any cell that disagrees. Every
#: family passes every capability today; a new family or capability that does not records
#: its gap here.
GAPS: dict[tuple[str, str], str] = {}


@dataclass
class Cell:
    """One check's outcome: passed or not, what it found, how long it took."""

    family: str
    capability: str
    ok: bool
    detail: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "capability": self.capability, "ok": self.ok, "detail": self.detail, "seconds": round(self.seconds, 2)}


class CheckFailed(GraphPruneError):
    """A capability ran but its result is wrong (the message says how)."""


def _text(work: Path) -> Path:
    from graphprune.data import default_text

    path = work / "text.txt"
    if not path.exists():
        path.write_text(default_text()[:6000], encoding="utf-8")  # the byte tokenizer: 6000 tokens
    return path


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    from graphprune.passes.infra import relative_diff

    return float(relative_diff(a, b))


def _tokens() -> torch.Tensor:
    from graphprune.models.tiny import random_tokens

    return random_tokens(2, 12, seed=5)


def _capture(family: str, work: Path) -> str:
    from graphprune.graph.model import GraphModel
    from graphprune.models.zoo import zoo_model

    model = zoo_model(family)
    ids = _tokens()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    gm = GraphModel.capture(model, name=f"tiny-{family}")
    diff = _relative(gm(ids), ref)
    if diff > 1e-5:
        raise CheckFailed(f"captured graph differs from the model: relative {diff:.2e}")
    return f"{len(gm.block_linears())} block Linears, relative diff {diff:.1e}"


def _prune(family: str, work: Path, method: str, pattern: str = "unstructured") -> str:
    from graphprune.models import load_model
    from graphprune.pipeline import PruneJob, run_prune

    nm = pattern != "unstructured"
    out = work / f"{family}-{method}-{pattern.replace(':', 'of')}"
    job = PruneJob(
        model=f"tiny-{family}", method=method, sparsity=None if nm else 0.5, pattern=pattern, calib_samples=4, calib_len=32, batch_size=2,
        text=(str(_text(work)),), out=str(out), overwrite=True, checkpoint=False,
    )
    outcome = run_prune(job, progress=False)
    gm = outcome.gm
    routers = {li.param_name for li in gm.routers}
    every = gm.block_matrices()
    matrices = {n: w.detach() for n, w in every.items() if n not in routers}
    for name in routers:
        if bool((every[name] == 0).any()):
            raise CheckFailed(f"the router {name} was pruned; routers stay dense")
    low = {n: float((w == 0).float().mean()) for n, w in matrices.items() if float((w == 0).float().mean()) < 0.49}
    if low:
        name, value = next(iter(low.items()))
        raise CheckFailed(f"{len(low)} of {len(matrices)} decoder weight matrices not pruned (e.g. {name}: {value:.0%} zeros)")
    if nm:
        for name, w in matrices.items():
            if w.shape[-1] % 4 == 0 and bool(((w.reshape(-1, 4) != 0).sum(-1) > 2).any()):
                raise CheckFailed(f"{name} is not 2:4")
    ids = _tokens()
    reloaded = load_model(str(out)).model
    with torch.no_grad():
        again = reloaded(input_ids=ids, use_cache=False).logits
    diff = _relative(again, outcome.gm(ids))
    if diff > 1e-5:
        raise CheckFailed(f"the saved folder reloads to different logits (relative {diff:.2e})")
    return f"{len(matrices)} matrices at {outcome.report['achieved_sparsity']:.0%}, reload diff {diff:.1e}"


def _rotated(family: str, source: str) -> tuple[Any, Any, torch.Tensor]:
    from graphprune.graph.model import GraphModel
    from graphprune.models.tiny import random_tokens
    from graphprune.models.zoo import zoo_model
    from graphprune.passes.fold_norms import FoldNormsPass
    from graphprune.passes.infra import PassContext, PassManager
    from graphprune.passes.rotate import LearnConfig, RotatePass
    from graphprune.solvers import SparsitySpec

    gm = GraphModel.capture(zoo_model(family), name=f"tiny-{family}")
    ids = _tokens()
    before = gm(ids)
    learn = LearnConfig(SparsitySpec(0.5), init="identity", steps=4, lr=0.1, blocks_per_step=2) if source == "learned" else None
    ctx = PassContext(progress=False, calibration=random_tokens(4, 32, seed=3))
    pm = PassManager([FoldNormsPass(), RotatePass(source, learn=learn)], ctx)
    return pm.run(gm), ctx, before


def _rotate(family: str, work: Path, source: str) -> str:
    gm, _, before = _rotated(family, source)
    diff = _relative(gm(_tokens()), before)
    if diff > 1e-4:
        raise CheckFailed(f"the rotated model's logits differ by {diff:.2e}")
    return f"logits kept (relative {diff:.1e})"


def _slice(family: str, work: Path) -> str:
    from graphprune.graph.stream import find_stream
    from graphprune.passes.infra import PassManager
    from graphprune.passes.slice import SlicePass

    gm, ctx, _ = _rotated(family, "pca")
    width = find_stream(gm).width
    gm = PassManager([SlicePass(0.25)], ctx).run(gm)
    after = find_stream(gm).width
    logits = gm(_tokens())
    if not after < width or not bool(torch.isfinite(logits).all()):
        raise CheckFailed(f"slicing left width {after} of {width}")
    return f"stream {width} -> {after}"


def _kernels(family: str, work: Path) -> str:
    from graphprune.graph.model import GraphModel
    from graphprune.models.zoo import zoo_model
    from graphprune.passes.infra import PassContext, PassManager, Prop
    from graphprune.passes.rewrite_kernels import RewriteKernelsPass

    gm = GraphModel.capture(zoo_model(family), name=f"tiny-{family}")
    with torch.no_grad():
        for li in gm.block_linears():
            w = gm.get_attr(li.weight)
            w.masked_fill_(w.abs() < w.abs().median(), 0.0)
    gm.props.add(Prop.PRUNED)  # half of every block weight zeroed by magnitude just above
    ids = _tokens()
    before = gm(ids)
    gm = PassManager([RewriteKernelsPass(repeats=3, warmup=1)], PassContext(progress=False)).run(gm)
    diff = _relative(gm(ids), before)
    if diff > 1e-5:
        raise CheckFailed(f"kernel rewrite changed the logits by {diff:.2e}")
    return f"logits kept (relative {diff:.1e})"


def _export(family: str, work: Path, fmt: str) -> str:
    from graphprune.exporters import export_onnx, export_torchscript
    from graphprune.graph.linears import standard_linears
    from graphprune.models.zoo import zoo_model

    model = zoo_model(family)
    standard_linears(model)
    if fmt == "onnx":
        report = export_onnx(model, work / f"{family}.onnx", optimize=False)
    else:
        report = export_torchscript(model, work / f"{family}.pt")
    return f"max |diff| {report.max_abs_diff:.1e}"


_CHECKS: dict[str, Callable[[str, Path], str]] = {
    "capture": _capture,
    **{m: (lambda f, w, m=m: _prune(f, w, m)) for m in SOLVERS},  # type: ignore[misc]
    "2:4": lambda f, w: _prune(f, w, "sparsegpt", "2:4"),
    **{r: (lambda f, w, r=r: _rotate(f, w, r)) for r in ROTATIONS},  # type: ignore[misc]
    "slice": _slice,
    "kernels": _kernels,
    "onnx": lambda f, w: _export(f, w, "onnx"),
    "torchscript": lambda f, w: _export(f, w, "torchscript"),
}


def check(family: str, capability: str, work: Path | None = None) -> Cell:
    """Run one check; exceptions become a failed :class:`Cell` holding the error's first line."""
    if capability not in _CHECKS:
        raise KeyError(f"unknown capability {capability!r}; choose from {', '.join(CAPABILITIES)}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphprune-support-") as tmp:
        try:
            detail = _CHECKS[capability](family, Path(work or tmp))
            ok = True
        except Exception as exc:  # every failure is a gap to report, with its message
            first = (str(exc).strip().splitlines() or [""])[0]
            detail, ok = f"{type(exc).__name__}: {first}", False
    return Cell(family, capability, ok, detail, time.perf_counter() - start)
