"""Writers for :class:`~graphprune.bench.latency.BenchResult`: JSON, a markdown table, a PNG plot.

Following the measurement protocol, CPU results are shown as speedups against the
baseline target (median and interquartile range of the paired per-repeat ratios);
absolute milliseconds appear only for GPU runs or when asked for explicitly.
Every writer stages its output next to the target and renames it into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from graphprune.bench.latency import BenchResult, LatencyRecord


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def write_json(result: BenchResult, path: str | Path) -> Path:
    """All records and the machine description as JSON."""
    return atomic_write(path, (json.dumps(result.to_dict(), indent=2) + "\n").encode())


def _show_absolute(result: BenchResult, absolute: bool | None) -> bool:
    return absolute if absolute is not None else str(result.machine.get("device", "cpu")).startswith("cuda")


def _machine_line(result: BenchResult) -> str:
    m = result.machine
    return (
        f"Machine: {m.get('cpu')} ({m.get('usable_cores')} usable of {m.get('logical_cores')} logical cores), "
        f"{m.get('platform')}; torch {m.get('torch')} ({m.get('torch_threads')} threads), "
        f"onnxruntime {m.get('onnxruntime')} ({m.get('ort_provider')}, intra-op threads "
        f"{m.get('ort_intra_op_threads')}{', spin-waiting off' if m.get('ort_allow_spinning') is False else ''}). Median of {result.repeats} interleaved runs after "
        f"{result.warmup} warm-up runs; speedup = {result.baseline} time / target time, paired per run, "
        "[interquartile range]."
    )


def to_markdown(result: BenchResult, *, absolute: bool | None = None) -> str:
    """A markdown table: one row per (case, runtime, target).

    Args:
        result: the benchmark result.
        absolute: include median milliseconds (default: only for GPU runs, per the protocol).
    """
    show_ms = _show_absolute(result, absolute)
    header = ["case", "shape", "runtime", "target", f"speedup vs {result.baseline}"]
    if show_ms:
        header.append("median ms [IQR]")
    lines = [_machine_line(result), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result.records:
        row = [
            r.case,
            f"{r.batch}x{r.seq}",
            r.runtime,
            r.target,
            f"{r.speedup:.2f}x [{r.speedup_q1:.2f}, {r.speedup_q3:.2f}]",
        ]
        if show_ms:
            row.append(f"{r.median_s * 1e3:.3f} [{r.q1_s * 1e3:.3f}, {r.q3_s * 1e3:.3f}]")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(result: BenchResult, path: str | Path, *, absolute: bool | None = None) -> Path:
    return atomic_write(path, to_markdown(result, absolute=absolute).encode())


def write_plot(result: BenchResult, path: str | Path, *, title: str | None = None) -> Path:
    """Bar chart of speedups vs the baseline (IQR error bars), grouped by case / runtime, as PNG.

    Uses matplotlib's object API with the Agg canvas (no pyplot global state, no display).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: list[tuple[str, str]] = []
    for r in result.records:
        if (r.case, r.runtime) not in groups:
            groups.append((r.case, r.runtime))
    names: list[str] = []
    for r in result.records:
        if r.target not in names:
            names.append(r.target)
    by_key: dict[tuple[str, str, str], LatencyRecord] = {(r.case, r.runtime, r.target): r for r in result.records}

    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(names)) / 2 + 2), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for g, (case, runtime) in enumerate(groups):
            rec = by_key.get((case, runtime, name))
            if rec is None:
                continue
            xs.append(g - 0.4 + width * (i + 0.5))
            ys.append(rec.speedup)
            lo.append(max(0.0, rec.speedup - rec.speedup_q1))
            hi.append(max(0.0, rec.speedup_q3 - rec.speedup))
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{case}\n{runtime}" for case, runtime in groups], fontsize=8)
    ax.set_ylabel(f"speedup vs {result.baseline} (median, IQR)")
    m = result.machine
    ax.set_title(title or f"{m.get('cpu')}, {m.get('torch_threads')} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=".png", dir=final.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final
