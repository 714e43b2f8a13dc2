"""Latency harness: dense vs pruned models, side by side, in several runtimes.

Cases are of three kinds:

* ``forward`` -- one call on ``[batch, seq]`` token ids, logits of every position, no
  KV cache: ``prefill`` (1x128), ``throughput`` (8x512) and ``step-nocache`` (1x1: one token
  *without* a cache, the per-token cost of the weights but not of a real decode step;
  ``step`` is its former name);
* ``ttft`` -- time to first token: a ``seq``-token prompt through the generation interface
  (empty KV cache, last-position logits) and the pick of the first token: ``ttft-128``,
  ``ttft-512`` (group ``ttft``);
* ``decode`` -- ``new_tokens`` greedy tokens after a ``seq``-token prompt, one step at a
  time with the KV cache; the time is that of the steps after the first token, and
  tokens per second are ``batch * new_tokens / time``: ``decode-b1`` and ``decode-b8``
  (64 tokens after 128, batch 1 and 8; group ``decode``).

Each is timed ``repeats`` times after ``warmup`` untimed runs. Within a case and runtime
the targets are **interleaved**: repeat ``r`` runs every target once, in an order
rotated by ``r``, so drift (thermal, other processes) hits all targets alike and
per-repeat ratios are paired. Every record carries the median and the spread
(quartiles, min, max) of its times and of its paired speedup against the baseline
target (``baseline time / target time``; > 1 means faster than the baseline).

Runtimes: ``eager`` (the nn.Module under ``torch.inference_mode``), ``torchscript``
(a given file, else the module traced in memory), ``onnxruntime``
(CPUExecutionProvider, spin-waiting off; a given file, else exported to a temporary file,
unchecked) and ``compile`` (ttft and decode only: the KV-cache step compiled by
``torch.compile``, see :class:`~graphprune.exporters.runners.CompiledRunner`; its
compilation happens in the warm-up runs). ``ttft`` and ``decode`` cases run generation exports
(:mod:`graphprune.exporters.generation`): a given folder, else one made in a temporary folder.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from graphprune.errors import ConfigError

#: every runtime; ``compile`` (torch.compile, inductor) times the ttft and decode cases only.
RUNTIMES = ("eager", "torchscript", "onnxruntime", "compile")
#: what a bench runs when not told: the runtimes that need no compilation.
DEFAULT_RUNTIMES = ("eager", "torchscript", "onnxruntime")


CaseKind = Literal["forward", "ttft", "decode"]


def shape_label(batch: int, seq: int, kind: str, new_tokens: int) -> str:
    """``BxS``, and ``BxS+N`` for a decode case of ``N`` new tokens."""
    return f"{batch}x{seq}" + (f"+{new_tokens}" if kind == "decode" else "")


@dataclass(frozen=True)
class Case:
    """One measurement: ``batch`` sequences of ``seq`` tokens, of a kind (see the module
    docstring); ``decode`` cases generate ``new_tokens`` tokens after the prompt."""

    name: str
    batch: int
    seq: int
    kind: CaseKind = "forward"
    new_tokens: int = 0

    @property
    def shape(self) -> str:
        return shape_label(self.batch, self.seq, self.kind, self.new_tokens)


PROTOCOL_CASES = (
    Case("prefill", 1, 128),
    Case("step-nocache", 1, 1),
    Case("throughput", 8, 512),
    Case("ttft-128", 1, 128, "ttft"),
    Case("ttft-512", 1, 512, "ttft"),
    Case("decode-b1", 1, 128, "decode", 64),
    Case("decode-b8", 8, 128, "decode", 64),
)
_BY_NAME = {c.name: c for c in PROTOCOL_CASES}
#: every protocol case by name, groups (``ttft``, ``decode``) and the former name ``step``
CASE_GROUPS: dict[str, tuple[Case, ...]] = {
    **{c.name: (c,) for c in PROTOCOL_CASES},
    "step": (_BY_NAME["step-nocache"],),
    "ttft": (_BY_NAME["ttft-128"], _BY_NAME["ttft-512"]),
    "decode": (_BY_NAME["decode-b1"], _BY_NAME["decode-b8"]),
}


@dataclass
class BenchTarget:
    """A model to time, given as a module and/or exported files.

    Attributes:
        name: label in records, tables and plots.
        model: the nn.Module (HF causal LM or ids -> logits); needed for ``eager``, and
            used to make the TorchScript / ONNX artifact when no file is given.
        onnx: an ONNX file with input ``input_ids`` and output ``logits``.
        torchscript: a TorchScript file mapping ids to logits.
        generation: generation export folders (``graphprune export --for generation``) by
            runtime (``"onnxruntime"``, ``"torchscript"``), for the ``ttft`` and ``decode`` cases.
    """

    name: str
    model: nn.Module | None = None
    onnx: str | Path | None = None
    torchscript: str | Path | None = None
    generation: dict[str, str | Path] = field(default_factory=dict)


@dataclass
class LatencyRecord:
    """Times of one (target, runtime, case), and its paired speedup against the baseline."""

    target: str
    runtime: str
    case: str
    batch: int
    seq: int
    repeats: int
    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float
    baseline: str
    speedup: float
    speedup_q1: float
    speedup_q3: float
    times_s: list[float] = field(repr=False, default_factory=list)
    kind: str = "forward"
    new_tokens: int = 0
    #: resident memory (MiB) the process grew by while the runtime loaded this target (weights,
    #: session, prepacked kernels); approximate: freed memory is not always returned to the OS
    load_mib: float | None = None
    #: size of the file the runtime ran (None for eager)
    file_bytes: int | None = None

    @property
    def shape(self) -> str:
        return shape_label(self.batch, self.seq, self.kind, self.new_tokens)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode cases: generated tokens (all rows) per second of the median run."""
        return self.batch * self.new_tokens / self.median_s if self.kind == "decode" and self.median_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.kind == "decode":
            data["tokens_per_s"] = self.tokens_per_s
        return data


@dataclass
class BenchResult:
    """All records of one :func:`bench_latency` run plus the machine they ran on."""

    records: list[LatencyRecord]
    machine: dict[str, Any]
    baseline: str
    repeats: int
    warmup: int

    def to_dicts(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records]

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "baseline": self.baseline,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "records": self.to_dicts(),
        }


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Cores, CPU model, library versions and thread settings, for the record."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": None,
        "ort_provider": "CPUExecutionProvider",
        "ort_intra_op_threads": threads if threads else "default",
        "ort_allow_spinning": False,
        "device": "cpu",
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


Runner = Callable[[Tensor], Any]


def peak_matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matmul rate on all torch threads: the best of ``repeats`` products
    of two ``size x size`` matrices (2·size³ FLOPs each), in GFLOP/s. The reference a
    calibration's ``forward_gflops`` (report.json, ``calibration_profile``) is measured against."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so an RSS difference measured
    after it counts new allocations rather than reuse of memory earlier work freed; no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_mib() -> float | None:
    """The process's resident set size in MiB (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _file_size(path: str | Path | None) -> int | None:
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        from graphprune.exporters.kv import read_description

        return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith(read_description(path)["file"]))
    return path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))


def _eager_runner(model: nn.Module) -> Runner:
    from graphprune.exporters.common import LogitsOnly

    wrapper = LogitsOnly(model)

    def run(ids: Tensor) -> Any:
        with torch.inference_mode():
            return wrapper(ids)

    return run


def _torchscript_runner(target: BenchTarget, example: Tensor, files: dict[str, Any]) -> Runner:
    if target.torchscript is not None:
        files["forward"] = target.torchscript
        module = torch.jit.load(str(target.torchscript), map_location="cpu")  # type: ignore[no-untyped-call]
    elif target.model is not None:
        from graphprune.exporters.torchscript import trace_logits

        module = trace_logits(target.model, example)
    else:
        raise ConfigError(f"target {target.name!r} has neither a TorchScript file nor a model to trace.")
    module.eval()

    def run(ids: Tensor) -> Any:
        with torch.no_grad():
            return module(ids)

    return run


def _onnxruntime_runner(target: BenchTarget, example: Tensor, threads: int | None, scratch: Path, files: dict[str, Any]) -> Runner:
    from graphprune.exporters.common import ort_session

    path = target.onnx
    files["forward"] = path
    if path is None:
        if target.model is None:
            raise ConfigError(f"target {target.name!r} has neither an ONNX file nor a model to export.")
        from graphprune.exporters.onnx import export_onnx

        path = export_onnx(target.model, scratch.with_suffix(".onnx"), example_tokens=example, check=False).path
    files["forward"] = path
    # Models run interleaved, each in its own session: a session whose threads spin-wait
    # after a run would take cores from the next model's run and bias the paired ratios.
    session = ort_session(path, threads=threads, spinning=False)

    def run(ids: Tensor) -> Any:
        return session.run(["logits"], {"input_ids": ids.numpy()})[0]

    return run


def _generation_runner(
    target: BenchTarget, runtime: str, threads: int | None, scratch: Path, files: dict[str, Any]
) -> Callable[[Case, Tensor], float]:
    """A function timing one ``ttft`` or ``decode`` run of ``target`` in ``runtime``."""
    from graphprune.exporters.runners import EagerRunner, generate, load_runner
    from graphprune.exporters.runners import Runner as StepRunner

    runner: StepRunner
    if runtime in ("eager", "compile"):
        if target.model is None:
            raise ConfigError(f"runtime {runtime!r} needs a model for target {target.name!r}.")
        if runtime == "compile":
            from graphprune.exporters.runners import CompiledRunner

            runner = CompiledRunner(target.model)
        else:
            runner = EagerRunner(target.model)
    else:
        folder = target.generation.get(runtime)
        files["generation"] = folder
        if folder is None:
            if target.model is None:
                raise ConfigError(f"target {target.name!r} has neither a generation export for {runtime} nor a model to export.")
            from graphprune.exporters.generation import export_generation

            fmt: Literal["onnx", "torchscript"] = "onnx" if runtime == "onnxruntime" else "torchscript"
            folder = export_generation(target.model, scratch.with_name(f"{scratch.name}-{runtime}-generation"), format=fmt, check_tokens=0).path.parent
        files["generation"] = folder
        runner = load_runner(folder, threads, spinning=False)

    def run(case: Case, ids: Tensor) -> float:
        if case.kind == "ttft":
            return generate(runner, ids, max_new_tokens=1, stop_at_eos=False).ttft_s
        return generate(runner, ids, max_new_tokens=case.new_tokens + 1, stop_at_eos=False).decode_s

    return run


def _check_available(target: BenchTarget, runtime: str, cases: Sequence[Case]) -> None:
    """Fail before any timing when a target cannot run a case in a runtime."""
    if runtime == "compile" and any(c.kind == "forward" for c in cases):
        forward = sorted(c.name for c in cases if c.kind == "forward")
        raise ConfigError(f"runtime 'compile' times the ttft and decode cases only; drop {forward} or time them in another runtime.")
    if target.model is not None:
        return
    if runtime in ("eager", "compile"):
        raise ConfigError(f"runtime {runtime!r} needs a model for target {target.name!r}.")
    if any(c.kind != "forward" for c in cases) and runtime not in target.generation:
        raise ConfigError(f"target {target.name!r} has neither a generation export for {runtime} nor a model to export.")
    if any(c.kind == "forward" for c in cases):
        file = target.torchscript if runtime == "torchscript" else target.onnx
        if file is None:
            what = "a TorchScript file nor a model to trace" if runtime == "torchscript" else "an ONNX file nor a model to export"
            raise ConfigError(f"target {target.name!r} has neither {what}.")


def _make_runner(target: BenchTarget, runtime: str, example: Tensor, threads: int | None, scratch: Path, files: dict[str, Any]) -> Runner:
    if runtime == "eager":
        if target.model is None:
            raise ConfigError(f"runtime 'eager' needs a model for target {target.name!r}.")
        return _eager_runner(target.model)
    if runtime == "torchscript":
        return _torchscript_runner(target, example, files)
    if runtime == "onnxruntime":
        return _onnxruntime_runner(target, example, threads, scratch, files)
    raise ConfigError(f"unknown runtime {runtime!r}; choose from {RUNTIMES}.")


def _normalise_targets(targets: Iterable[BenchTarget] | Mapping[str, nn.Module]) -> list[BenchTarget]:
    if isinstance(targets, Mapping):
        out = [BenchTarget(name, model=model) for name, model in targets.items()]
    else:
        out = list(targets)
    if not out:
        raise ConfigError("bench_latency needs at least one target.")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"target names must be unique, got {names}.")
    return out


def _vocab(targets: list[BenchTarget], vocab_size: int | None) -> int:
    if vocab_size:
        return vocab_size
    sizes = [getattr(getattr(t.model, "config", None), "vocab_size", None) for t in targets]
    known = [int(s) for s in sizes if s]
    if not known:
        raise ConfigError("cannot tell the vocabulary size of file-only targets; pass vocab_size.")
    return min(known)  # ids valid for every model


def _seconds(run: Runner, ids: Tensor) -> float:
    start = time.perf_counter()
    run(ids)
    return time.perf_counter() - start


def bench_latency(
    targets: Iterable[BenchTarget] | Mapping[str, nn.Module],
    runtimes: Sequence[str] = DEFAULT_RUNTIMES,
    cases: Sequence[Case] = PROTOCOL_CASES,
    *,
    repeats: int = 20,
    warmup: int = 3,
    baseline: str | None = None,
    threads: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> BenchResult:
    """Time every target in every runtime on every case, interleaving the targets.

    Args:
        targets: :class:`BenchTarget` list, or ``{name: model}``.
        runtimes: any of ``"eager"``, ``"torchscript"``, ``"onnxruntime"``, ``"compile"``.
        cases: what to time; default every protocol case (forward, ttft and decode).
        repeats: timed runs per (target, runtime, case).
        warmup: untimed runs before them.
        baseline: name of the target speedups are measured against (default: the first).
        threads: torch and onnxruntime intra-op threads for the run (default: unchanged).
        vocab_size: token id range (default: from the models' configs).
        seed: seed of the random token ids.
        progress: show a tqdm bar.

    Returns:
        A :class:`BenchResult`: one :class:`LatencyRecord` per (case, runtime, target).
    """
    targets = _normalise_targets(targets)
    baseline = baseline or targets[0].name
    if baseline not in {t.name for t in targets}:
        raise ConfigError(f"baseline {baseline!r} is not one of the targets {[t.name for t in targets]}.")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}.")
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ConfigError(f"unknown runtime(s) {unknown}; choose from {RUNTIMES}.")
    for target in targets:
        for runtime in runtimes:
            _check_available(target, runtime, cases)
    vocab = _vocab(targets, vocab_size)
    gen = torch.Generator().manual_seed(seed)
    inputs = {c.name: torch.randint(0, vocab, (c.batch, c.seq), generator=gen) for c in cases}
    example = torch.randint(0, vocab, (2, 16), generator=gen)

    old_threads = torch.get_num_threads()
    records: list[LatencyRecord] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphprune-bench-")))
        if threads:
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, old_threads)
        models = [t.model for t in targets if t.model is not None]
        for model in models:
            was_training = model.training
            model.eval()
            stack.callback(model.train, was_training)
        machine = machine_info(threads)
        bar = stack.enter_context(
            tqdm(
                total=len(runtimes) * len(cases) * len(targets) * (repeats + warmup),
                desc="latency",
                unit="run",
                disable=not progress,
            )
        )
        forward = [c for c in cases if c.kind == "forward"]
        generating = [c for c in cases if c.kind != "forward"]
        for runtime in runtimes:
            bar.set_postfix_str(f"{runtime}: preparing")
            timers: dict[str, Callable[[Case, Tensor], float]] = {}
            gen_timers: dict[str, Callable[[Case, Tensor], float]] = {}
            loaded: dict[str, tuple[float | None, dict[str, Any]]] = {}
            for i, t in enumerate(targets):
                files: dict[str, Any] = {}
                release_freed_memory()
                before = resident_mib()
                if forward:
                    run = _make_runner(t, runtime, example, threads, tmp / f"target{i}", files)
                    timers[t.name] = lambda case, ids, run=run: _seconds(run, ids)  # type: ignore[misc]
                if generating:
                    gen_timers[t.name] = _generation_runner(t, runtime, threads, tmp / f"target{i}", files)
                after = resident_mib()
                loaded[t.name] = (None if before is None or after is None else round(after - before, 1), files)
            for case in cases:
                bar.set_postfix_str(f"{runtime} / {case.name}")
                ids = inputs[case.name]
                timer = timers if case.kind == "forward" else gen_timers
                for target in targets:
                    for _ in range(warmup):
                        timer[target.name](case, ids)
                        bar.update(1)
                times: dict[str, list[float]] = {t.name: [] for t in targets}
                for r in range(repeats):
                    shift = r % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        times[target.name].append(timer[target.name](case, ids))
                        bar.update(1)
                for record in _records(times, baseline, runtime, case):
                    memory, files = loaded[record.target]
                    record.load_mib = memory
                    if runtime != "eager":
                        record.file_bytes = _file_size(files.get("forward" if case.kind == "forward" else "generation"))
                    records.append(record)
            del timers, gen_timers
    return BenchResult(records=records, machine=machine, baseline=baseline, repeats=repeats, warmup=warmup)


def _records(times: dict[str, list[float]], baseline: str, runtime: str, case: Case) -> list[LatencyRecord]:
    base = times[baseline]
    out = []
    for name, values in times.items():
        q1, median, q3 = _quartiles(values)
        ratios = [b / t if t > 0 else float("inf") for b, t in zip(base, values, strict=True)]
        r1, rmed, r3 = _quartiles(ratios)
        out.append(
            LatencyRecord(
                target=name,
                runtime=runtime,
                case=case.name,
                batch=case.batch,
                seq=case.seq,
                repeats=len(values),
                median_s=median,
                q1_s=q1,
                q3_s=q3,
                min_s=min(values),
                max_s=max(values),
                baseline=baseline,
                speedup=rmed,
                speedup_q1=r1,
                speedup_q3=r3,
                times_s=list(values),
                kind=case.kind,
                new_tokens=case.new_tokens,
            )
        )
    return out
