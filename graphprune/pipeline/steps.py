"""Pipelines with steps after pruning: exports and a latency benchmark, run inside the output folder.

A :class:`PipelineJob` is a :class:`~graphprune.pipeline.jobs.PruneJob` plus the steps that follow
it. :func:`run_pipeline` prunes (and evaluates), then runs each step in the *staging* copy of the
output folder through the ``finish`` hook of :func:`~graphprune.pipeline.prune.run_prune`, so the
folder, with its exports and benchmark, appears complete or not at all, and the checkpoint is
deleted only after that. This is what ``graphprune run`` executes; recipes
(:mod:`graphprune.recipes`) build these jobs from YAML, and nothing here knows about YAML.

Example::

    from graphprune.pipeline import PruneJob
    from graphprune.pipeline.steps import BenchStep, ExportStep, PipelineJob, TorchScriptExport, run_pipeline

    job = PipelineJob(PruneJob(model="tiny-llama", method="wanda", pattern="2:4", out="out/w24"),
                      [ExportStep(torchscript=TorchScriptExport()), BenchStep(runtimes=("eager", "torchscript"))])
    outcome = run_pipeline(job)
    print(outcome.report["steps"]["bench"])   # {"path": "bench.json", "markdown": "bench.md", "records": ...}

A new kind of step is a :class:`Step` subclass: a ``name`` (its key in ``report["steps"]``) and a
``run(ctx)`` that writes into ``ctx.folder`` and returns what the report should say about it.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, ClassVar

from torch import nn
from tqdm.auto import tqdm

from graphprune.bench import CASE_GROUPS, BenchTarget, Case, bench_latency, write_json, write_markdown
from graphprune.errors import ConfigError
from graphprune.exporters import ExportReport, export_onnx, export_torchscript
from graphprune.models import load_model
from graphprune.pipeline.jobs import PruneJob
from graphprune.pipeline.prune import PruneOutcome, run_prune

log = logging.getLogger(__name__)


def check_inside(path: str) -> None:
    """Refuse a step's file name that would land outside the output folder (absolute, ``..``, empty)."""
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ConfigError(f"{path!r} must be a file name inside the output folder (relative, no '..').")


@dataclass
class StepContext:
    """What a step sees.

    Attributes:
        folder: the staging output folder; it is renamed into place afterwards, so reports store
            paths relative to it.
        outcome: the pruning outcome (``outcome.loaded.model`` is the pruned model).
        job: the prune job that ran.
        progress: show progress bars.
        files: files written by earlier steps, by format (``"onnx"``, ``"torchscript"``), for later ones.
        results: earlier steps' results, by step name.
    """

    folder: Path
    outcome: PruneOutcome
    job: PruneJob
    progress: bool = True
    files: dict[str, Path] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


class Step(ABC):
    """A step run after pruning, inside the staging output folder; subclasses are (frozen) dataclasses."""

    name: ClassVar[str]  # its key in report["steps"]

    @abstractmethod
    def run(self, ctx: StepContext) -> dict[str, Any]:
        """Do the step; return its JSON-serialisable result (paths relative to ``ctx.folder``)."""


# ---------------------------------------------------------------------------- export
@dataclass(frozen=True)
class OnnxExport:
    """An ONNX file checked in onnxruntime (see :func:`graphprune.exporters.export_onnx`)."""

    format: ClassVar[str] = "onnx"
    path: str = "model.onnx"
    check: bool = True
    atol: float = 1e-4
    sparse_initializers: bool | str = False  # True / "auto", "coo" or "bitmask": mostly-zero weights stored compactly
    optimize: bool = True

    def __post_init__(self) -> None:
        check_inside(self.path)

    def write(self, model: nn.Module, path: Path) -> ExportReport:
        return export_onnx(model, path, sparse_initializers=self.sparse_initializers, check=self.check, atol=self.atol, optimize=self.optimize)


@dataclass(frozen=True)
class TorchScriptExport:
    """A TorchScript file checked in a fresh process (see :func:`graphprune.exporters.export_torchscript`)."""

    format: ClassVar[str] = "torchscript"
    path: str = "model.pt"
    check: bool = True
    atol: float = 1e-4

    def __post_init__(self) -> None:
        check_inside(self.path)

    def write(self, model: nn.Module, path: Path) -> ExportReport:
        return export_torchscript(model, path, check=self.check, atol=self.atol)


@dataclass(frozen=True)
class ExportStep(Step):
    """Export the pruned model into the output folder; its result has one entry per format."""

    name: ClassVar[str] = "export"
    onnx: OnnxExport | None = None
    torchscript: TorchScriptExport | None = None

    def run(self, ctx: StepContext) -> dict[str, Any]:
        chosen = [f for f in (self.onnx, self.torchscript) if f is not None]
        results: dict[str, Any] = {}
        for spec in tqdm(chosen, desc="export", unit="file", disable=not ctx.progress):
            info = spec.write(ctx.outcome.loaded.model, ctx.folder / spec.path).to_dict()
            info["path"] = spec.path  # relative: the staging folder is renamed afterwards
            del info["external_data"]
            results[spec.format] = info
            ctx.files[spec.format] = ctx.folder / spec.path
            log.info("exported %s to %s", spec.format, spec.path)
        return results


# ---------------------------------------------------------------------------- bench


@dataclass(frozen=True)
class BenchStep(Step):
    """Time the pruned model (and the dense one) with :func:`graphprune.bench.bench_latency`.

    Runtimes other than eager use the files of an earlier :class:`ExportStep` when there are any.
    """

    name: ClassVar[str] = "bench"
    runtimes: tuple[str, ...] = ("eager",)
    cases: tuple[Case, ...] = (*CASE_GROUPS["prefill"], *CASE_GROUPS["step-nocache"])
    repeats: int = 10
    warmup: int = 2
    threads: int | None = None
    dense: bool = True  # also time the unpruned model, the baseline of the speedups
    path: str = "bench.json"
    markdown: str | None = "bench.md"

    def __post_init__(self) -> None:
        for path in (self.path, self.markdown):
            if path is not None:
                check_inside(path)

    def run(self, ctx: StepContext) -> dict[str, Any]:
        job = ctx.job
        pruned = BenchTarget("pruned", model=ctx.outcome.loaded.model, onnx=ctx.files.get("onnx"), torchscript=ctx.files.get("torchscript"))
        targets = [pruned]
        if self.dense:
            dense = load_model(job.model, trust_remote_code=job.trust_remote_code, seed=job.seed)
            targets.insert(0, BenchTarget("dense", model=dense.model))
        result = bench_latency(
            targets, self.runtimes, self.cases, repeats=self.repeats, warmup=self.warmup, threads=self.threads, seed=job.seed, progress=ctx.progress
        )
        write_json(result, ctx.folder / self.path)
        if self.markdown is not None:
            write_markdown(result, ctx.folder / self.markdown)
        return {"path": self.path, "markdown": self.markdown, "records": len(result.records)}


# ---------------------------------------------------------------------------- pipelines
@dataclass
class PipelineJob:
    """A prune job and the steps run after it, in order (export before bench: bench times the exported files)."""

    prune: PruneJob
    steps: list[Step] = field(default_factory=list)

    def validate(self) -> None:
        """Cheap checks before loading anything: step results are stored by name, so names are unique."""
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ConfigError(f"each step may appear once, got {names}.")


def run_pipeline(
    job: PipelineJob,
    *,
    progress: bool = True,
    on_stage: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> PruneOutcome:
    """Prune (and evaluate), then run the steps in the staging output folder.

    The output folder defaults to ``job.prune.default_out_dir()``. Returns the outcome;
    ``outcome.report["steps"]`` holds each step's result by name (also in ``report.json``) and
    ``outcome.report["out"]`` the folder written.
    """
    job.validate()
    prune = job.prune if job.prune.out is not None else replace(job.prune, out=str(job.prune.default_out_dir()))

    def finish(folder: Path, outcome: PruneOutcome) -> None:
        ctx = StepContext(folder, outcome, prune, progress)
        for step in job.steps:
            ctx.results[step.name] = step.run(ctx)
        outcome.report["steps"] = ctx.results

    outcome = run_prune(prune, progress=progress, on_stage=on_stage, finish=finish if job.steps else None)
    outcome.report["out"] = prune.out
    return outcome
