"""Benchmarks: the latency harness (dense vs pruned, eager / TorchScript / onnxruntime)
and its writers (JSON, markdown table, PNG plot)."""

from graphprune.bench.latency import (
    CASE_GROUPS,
    DEFAULT_RUNTIMES,
    PROTOCOL_CASES,
    RUNTIMES,
    BenchResult,
    BenchTarget,
    Case,
    LatencyRecord,
    bench_latency,
    machine_info,
)
from graphprune.bench.report import to_markdown, write_json, write_markdown, write_plot

__all__ = [
    "CASE_GROUPS",
    "PROTOCOL_CASES",
    "DEFAULT_RUNTIMES",
    "RUNTIMES",
    "BenchResult",
    "BenchTarget",
    "Case",
    "LatencyRecord",
    "bench_latency",
    "machine_info",
    "to_markdown",
    "write_json",
    "write_markdown",
    "write_plot",
]
