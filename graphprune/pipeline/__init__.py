"""The driver layer: one-call pipelines behind the CLI, the recipes and the benchmarks.

* :mod:`~graphprune.pipeline.jobs` -- typed jobs (``PruneJob``, ``EvalJob``, ``ExportJob``, ``GenerateJob``, ``BenchJob``);
* :mod:`~graphprune.pipeline.prune` -- ``run_prune`` / ``run_eval`` and the pass pipelines they build;
* :mod:`~graphprune.pipeline.export_bench` -- ``run_export`` / ``run_bench``;
* :mod:`~graphprune.pipeline.generate` -- ``run_generate`` (``graphprune generate``);
* :mod:`~graphprune.pipeline.checkpoints` -- which checkpoint belongs to which job;
* :mod:`~graphprune.pipeline.steps` -- ``PipelineJob`` (a prune job plus export and bench
  steps, what ``graphprune run`` executes) and ``run_pipeline``.

This package is the only place that wires passes together into a pipeline; everything
below it (passes, solvers, graph, exporters) knows nothing of jobs.
"""
from graphprune.pipeline.export_bench import run_bench, run_export
from graphprune.pipeline.generate import run_generate
from graphprune.pipeline.jobs import BenchJob, EvalJob, ExportJob, GenerateJob, PruneJob
from graphprune.pipeline.prune import PruneOutcome, PrunePlan, build_passes, run_eval, run_prune
from graphprune.pipeline.steps import BenchStep, ExportStep, PipelineJob, Step, run_pipeline

__all__ = [
    "BenchJob",
    "BenchStep",
    "EvalJob",
    "ExportJob",
    "ExportStep",
    "GenerateJob",
    "PipelineJob",
    "PruneJob",
    "PruneOutcome",
    "Step",
    "PrunePlan",
    "build_passes",
    "run_bench",
    "run_eval",
    "run_export",
    "run_generate",
    "run_pipeline",
    "run_prune",
]
