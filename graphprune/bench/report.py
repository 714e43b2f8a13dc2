"""Writers for :class:`~graphprune.bench.latency.BenchResult`: JSON, a markdown table, a PNG plot.

Following the measurement protocol, CPU results are shown as speedups against the
baseline target (median and interquartile range of the paired per-repeat ratios);
absolute milliseconds appear only for GPU runs or when asked for explicitly.
Every writer stages its output next to the target and renames it into place
(:mod:`graphprune.fileio`); a full disk or a missing permission ends as one
:class:`~graphprune.errors.OutputError` and leaves nothing behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from graphprune.bench.latency import BenchResult, LatencyRecord
from graphprune.fileio import atomic_path, write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: at most this many panels side by side; more (case, runtime) pairs wrap to further rows
PLOT_COLUMNS = 4
#: inches per panel: wide enough for a few target names under the bars
PANEL_SIZE = (4.0, 3.2)


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place."""
    return write_bytes(path, data)


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
        f"{m.get('ort_intra_op_threads')}{', spin-waiting off' if m.get('ort_allow_spinning') is False else ''}). "
        f"Median of {result.repeats} interleaved runs after "
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
    header += ["memory to load, MiB", "file, MiB"]
    lines = [_machine_line(result), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result.records:
        row = [
            r.case,
            r.shape,
            r.runtime,
            r.target,
            f"{r.speedup:.2f}x [{r.speedup_q1:.2f}, {r.speedup_q3:.2f}]",
        ]
        if show_ms:
            row.append(f"{r.median_s * 1e3:.3f} [{r.q1_s * 1e3:.3f}, {r.q3_s * 1e3:.3f}]")
        if r.tokens_per_s is not None:
            row[-1 if show_ms else 4] += f"; {r.tokens_per_s:.1f} tok/s"
        row += ["-" if r.load_mib is None else f"{r.load_mib:.0f}", "-" if r.file_bytes is None else f"{r.file_bytes / 2**20:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(result: BenchResult, path: str | Path, *, absolute: bool | None = None) -> Path:
    return atomic_write(path, to_markdown(result, absolute=absolute).encode())


def _panels(result: BenchResult) -> tuple[list[tuple[str, str]], list[str], dict[tuple[str, str, str], LatencyRecord]]:
    """(case, runtime) pairs and target names in the order they were measured, and the records by key."""
    groups: list[tuple[str, str]] = []
    names: list[str] = []
    for r in result.records:
        if (r.case, r.runtime) not in groups:
            groups.append((r.case, r.runtime))
        if r.target not in names:
            names.append(r.target)
    if result.baseline in names:  # the baseline first, as in the tables
        names.remove(result.baseline)
        names.insert(0, result.baseline)
    return groups, names, {(r.case, r.runtime, r.target): r for r in result.records}


def _layout(groups: list[tuple[str, str]]) -> tuple[int, int, dict[tuple[str, str], int]]:
    """Rows, columns and the slot of each panel: one row per case and one column per runtime when
    there are 2 to :data:`PLOT_COLUMNS` runtimes, else the panels in order, wrapped."""
    cases = list(dict.fromkeys(case for case, _ in groups))
    runtimes = list(dict.fromkeys(runtime for _, runtime in groups))
    if 2 <= len(runtimes) <= PLOT_COLUMNS:
        return len(cases), len(runtimes), {(c, r): cases.index(c) * len(runtimes) + runtimes.index(r) for c, r in groups}
    ncols = max(1, min(PLOT_COLUMNS, len(groups)))
    return max(1, math.ceil(len(groups) / ncols)), ncols, {g: i for i, g in enumerate(groups)}


def plot_figure(result: BenchResult, *, title: str | None = None) -> Figure:
    """The speedup plot: one panel per (case, runtime), one bar per target, as a matplotlib ``Figure``.

    Each bar is the median paired speedup against the baseline with its interquartile
    range as error bar and the value written above it; the dashed line marks 1.0 (as fast
    as the baseline, which is the grey bar). Panels share the y axis so they compare at a
    glance; with 2 to :data:`PLOT_COLUMNS` runtimes each row is a case and each column a
    runtime, else the panels wrap after :data:`PLOT_COLUMNS` per row. Uses matplotlib's
    object API with the Agg canvas (no pyplot global state, no display).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups, names, by_key = _panels(result)
    nrows, ncols, slots = _layout(groups)
    fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    colors = {name: "#9e9e9e" if name == result.baseline else palette[(i - 1) % len(palette)] for i, name in enumerate(names)}
    shapes = {r.case: r.shape for r in result.records}
    top = max([1.0] + [r.speedup_q3 for r in result.records if math.isfinite(r.speedup_q3)])
    long_names = max((len(n) for n in names), default=0) > 8
    for (case, runtime), slot in slots.items():
        ax = axes[slot]
        for x, name in enumerate(names):
            rec = by_key.get((case, runtime, name))
            if rec is None:
                continue
            err = [[max(0.0, rec.speedup - rec.speedup_q1)], [max(0.0, rec.speedup_q3 - rec.speedup)]]
            ax.bar(x, rec.speedup, width=0.7, color=colors[name], yerr=err, capsize=4, error_kw={"linewidth": 1})
            ax.text(x, rec.speedup_q3 + 0.02 * top, f"{rec.speedup:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"{case} ({shapes[case]}), {runtime}", fontsize=10)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8, rotation=25 if long_names else 0, ha="right" if long_names else "center")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
        ax.set_axisbelow(True)
    used = set(slots.values())
    for slot, ax in enumerate(axes):
        if slot not in used:
            fig.delaxes(ax)  # the end of the last row, or a (case, runtime) that was not measured
    axes[min(used, default=0)].set_ylim(0, top * 1.18)
    for row in range(nrows):
        first = min((s for s in used if s // ncols == row), default=None)
        if first is not None:
            axes[first].set_ylabel(f"speedup vs {result.baseline}", fontsize=9)
            axes[first].yaxis.set_tick_params(labelleft=True)
    m = result.machine
    fig.suptitle(title or f"speedup vs {result.baseline} ({m.get('cpu')}, {m.get('torch_threads')} threads)", fontsize=11)
    fig.supxlabel(
        f"bars: median of {result.repeats} paired runs (baseline time / target time), error bars: interquartile range; "
        "> 1 is faster than the baseline",
        fontsize=8,
    )
    return fig


def write_plot(result: BenchResult, path: str | Path, *, title: str | None = None) -> Path:
    """Write :func:`plot_figure` as a PNG to ``path`` (atomically); return ``path``."""
    fig = plot_figure(result, title=title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
