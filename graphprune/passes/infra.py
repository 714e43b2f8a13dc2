"""Pass infrastructure: Pass, Sequential, PassResult, PassContext, instruments, PassManager.

A pass is an object with a ``name``, the properties it ``requires``, ``establishes`` and
``invalidates``, whether it ``preserves_function`` and whether it works ``in_place`` (edits
the :class:`GraphModel` it is given) or returns a new one. :class:`Sequential` composes
passes into one (its requirements and effects are derived from its members), so a pipeline
such as observers -> prune -> remove observers is built once.

The :class:`PassManager` refuses a pipeline whose requirements are not met before running
anything (naming the pass and the passes before it), runs every pass between the
``before_pass`` / ``after_pass`` hooks of its *instruments* (timing, memory, verification,
progress, or your own), invalidates the graph's cached queries after a pass that reports
``modified``, and keeps the caller's graph whole: an in-place pass that fails (an exception,
a malformed graph, or changed logits while claiming to preserve them) is rolled back to a
snapshot taken before it ran.

What passes share is typed: calibration tokens are :attr:`PassContext.calibration`, and
what passes learn about a graph (observers, masks, statistics, reports) lives in
``GraphModel.state`` (:class:`graphprune.graph.model.PassState`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor

from graphprune.errors import DataError, PassOrderError, VerificationError
from graphprune.graph.model import GraphModel

log = logging.getLogger(__name__)


class Prop:
    """Names of properties a pass can establish or require (plain strings, namespaced)."""

    OBSERVERS = "graph.observers_inserted"
    CALIBRATED = "stats.calibrated"
    GRADIENTS = "stats.gradients"
    PRUNED = "weights.pruned"
    NORMS_FOLDED = "graph.norms_folded"
    ROTATED = "graph.rotated"
    SLICED = "graph.sliced"
    STRUCTURED = "graph.structured"
    KERNELS = "graph.kernels_rewritten"


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


#: :func:`release_free_memory` does nothing when told that less than this was freed.
RELEASE_MIN_BYTES = 4 * 1024 * 1024


def release_free_memory(scale_bytes: int | None = None) -> None:
    """Give memory the process no longer uses back to the operating system.

    Called between calibration stages and before evaluation. Two things keep freed memory
    resident otherwise: tensors in reference cycles (graph nodes, hooks) until the cyclic
    collector runs, and glibc's allocator, which keeps freed blocks below its (self-raising,
    up to 32 MiB) mmap threshold in its heaps; activations and per-Linear statistics are of
    that size, so a stage-wise prune leaves hundreds of MiB of free but resident heap behind.
    ``malloc_trim(0)`` returns those pages; where the C library has no such call only the
    collector runs.

    ``scale_bytes``: the size of what the caller just dropped (e.g. a stage's weights, which
    its statistics and activations scale with). Below :data:`RELEASE_MIN_BYTES` nothing is
    done: a full collection walks every live object of the process (a second or more in a
    process holding many objects), which pays only when there is memory worth returning.
    """
    if scale_bytes is not None and scale_bytes < RELEASE_MIN_BYTES:
        return
    gc.collect()
    trim_heap()


def trim_heap(scale_bytes: int | None = None) -> None:
    """``malloc_trim(0)`` alone, without the cyclic collector: for points inside a stage where
    what was freed holds no reference cycles (a forward's transients, between the statistics
    pass and the solve, after each Linear's solve, and before the propagation). Trimming there keeps the
    heap's free holes from adding to the peak: on the default model it lowers a SparseGPT
    prune's peak RSS by about 120 MiB at a cost of milliseconds. Below
    :data:`RELEASE_MIN_BYTES` of ``scale_bytes`` nothing is done."""
    if scale_bytes is not None and scale_bytes < RELEASE_MIN_BYTES:
        return
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class PassResult:
    """What a pass did: the (possibly new) graph, whether it changed, and a report."""

    gm: GraphModel
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement ``run``.

    Attributes:
        name: shown in reports and errors (the class name by default).
        requires / establishes / invalidates: property names (see :class:`Prop`).
        preserves_function: the pass leaves the logits unchanged (the manager checks it).
        in_place: the pass edits the GraphModel it is given (True for every built-in pass);
            a pass that returns a new GraphModel and leaves its input untouched sets False,
            and the manager then needs no snapshot to keep the caller's graph whole.
        edits_weights: the pass may change parameter or buffer values. A pass that only edits
            the graph and its modules (inserting or removing observers) sets False, and its
            rollback snapshot shares the weights instead of copying the whole model.
    """

    name: str = ""
    requires: frozenset[str] = frozenset()
    establishes: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()
    preserves_function: bool = False
    in_place: bool = True
    edits_weights: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Sequential(Pass):
    """Several passes run as one, in order, by a nested manager (same context and instruments).

    Its requirements are those of its members that no earlier member establishes; it
    establishes what its members leave established, invalidates what they leave removed, and
    preserves function only if every member does. Its report lists the members' reports.
    """

    def __init__(self, passes: Iterable[Pass], name: str = "sequential") -> None:
        self.passes = list(passes)
        if not self.passes:
            raise PassOrderError(f"{name}: a Sequential pass needs at least one pass.")
        self.name = name
        requires: set[str] = set()
        have: set[str] = set()
        removed: set[str] = set()
        for p in self.passes:
            requires |= p.requires - have
            have = (have - p.invalidates) | p.establishes
            removed = (removed | p.invalidates) - p.establishes
        self.requires = frozenset(requires)
        self.establishes = frozenset(have)
        self.invalidates = frozenset(removed)
        self.preserves_function = all(p.preserves_function for p in self.passes)
        self.in_place = any(p.in_place for p in self.passes)
        self.edits_weights = any(p.edits_weights for p in self.passes)

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        # the members run between the enclosing manager's instruments (one timer, one progress
        # indentation, one verifier) and inside its snapshot, if it took one
        outer = ctx._running[-1] if ctx._running else None
        manager = PassManager(self.passes, ctx)
        if outer is not None:
            manager._instruments, manager._covered = outer
        out = manager.run(gm)
        modified = any(r.modified for _, r, _ in manager.history)
        return PassResult(out, modified, {"passes": manager.report()})

    def __repr__(self) -> str:
        return f"Sequential({', '.join(repr(p) for p in self.passes)})"


class Instrument:
    """Hooks around every pass a manager runs (nested Sequential members included).

    ``before_pass`` runs before the pass, ``after_pass`` after it succeeded (it may raise
    :class:`VerificationError` to reject the result; the manager then rolls the pass back),
    ``on_failure`` after the pass or a later instrument failed. ``record`` is merged into
    the pass's report entry.
    """

    def before_pass(self, p: Pass, gm: GraphModel, ctx: PassContext) -> None:
        """Called before ``p`` runs on ``gm``."""

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        """Called after ``p`` returned ``result``; returns fields for the pass's report entry."""
        return {}

    def on_failure(self, p: Pass, exc: BaseException, ctx: PassContext) -> None:
        """Called when ``p`` (or an instrument's check of it) failed, before the rollback."""


class Timing(Instrument):
    """Wall seconds of each pass."""

    def __init__(self) -> None:
        self._t0: list[float] = []

    def before_pass(self, p: Pass, gm: GraphModel, ctx: PassContext) -> None:
        self._t0.append(time.perf_counter())

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        return {"seconds": round(time.perf_counter() - self._t0.pop(), 3)}

    def on_failure(self, p: Pass, exc: BaseException, ctx: PassContext) -> None:
        if self._t0:
            self._t0.pop()


class Memory(Instrument):
    """Peak resident memory of the process after each pass, and how much the pass raised it."""

    def __init__(self) -> None:
        self._before: list[float] = []

    def before_pass(self, p: Pass, gm: GraphModel, ctx: PassContext) -> None:
        self._before.append(peak_rss_mb())

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        peak = peak_rss_mb()
        return {"peak_rss_mb": round(peak, 1), "peak_rss_growth_mb": round(peak - self._before.pop(), 1)}

    def on_failure(self, p: Pass, exc: BaseException, ctx: PassContext) -> None:
        if self._before:
            self._before.pop()


def relative_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


class Verify(Instrument):
    """Lint the graph after every pass; for function-preserving passes, compare the logits of
    a probe batch before and after (relative tolerance ``ctx.rtol``)."""

    def __init__(self) -> None:
        self._before: list[Tensor | None] = []

    def before_pass(self, p: Pass, gm: GraphModel, ctx: PassContext) -> None:
        self._before.append(gm(ctx.probe_batch(gm)) if p.preserves_function else None)

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        before = self._before.pop()
        gm = result.gm
        try:
            gm.lint()
        except Exception as exc:
            raise VerificationError(f"pass {p.name} left a malformed graph: {exc}") from exc
        if before is None:
            return {}
        after = gm(ctx.probe_batch(gm))
        diff = relative_diff(after, before) if after.shape == before.shape else float("inf")
        if not diff <= ctx.rtol:
            raise VerificationError(
                f"pass {p.name} claims to preserve function but changed the logits "
                f"(relative difference {diff:.3g} > {ctx.rtol:g}); the graph was restored to its state before the pass."
            )
        return {"max_rel_logit_diff": diff}

    def on_failure(self, p: Pass, exc: BaseException, ctx: PassContext) -> None:
        if self._before:
            self._before.pop()


class Progress(Instrument):
    """One log line as each top-level pass starts and ends (passes show their own bars)."""

    def __init__(self) -> None:
        self._depth = 0

    def before_pass(self, p: Pass, gm: GraphModel, ctx: PassContext) -> None:
        self._depth += 1
        log.info("%spass %s on %s", "  " * (self._depth - 1), p.name, gm.name)

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> dict[str, Any]:
        self._depth -= 1
        log.info("%spass %s: modified=%s", "  " * self._depth, p.name, result.modified)
        return {}

    def on_failure(self, p: Pass, exc: BaseException, ctx: PassContext) -> None:
        self._depth -= 1
        log.info("%spass %s failed: %s", "  " * self._depth, p.name, exc)


Rollback = Literal["verified", "all", "none"]


@dataclass
class PassContext:
    """Scoped settings and shared inputs of a pipeline run.

    Attributes:
        seed: seed for every random choice a pass makes.
        verify: lint after every pass and check function-preserving passes numerically
            (adds the :class:`Verify` instrument).
        rtol: relative tolerance of that check (max |Δlogits| / max |logits|).
        probe: token ids for the numerical check (a small random batch by default).
        progress: show progress bars (and log a line per pass).
        calibration: calibration token ids ``[N, L]`` for passes that calibrate.
        rollback: which in-place passes are snapshotted so a failure leaves the graph as it
            was: ``"verified"`` (function-preserving passes while ``verify`` is on: the ones a
            check can reject; the default), ``"all"`` (every in-place pass; costs one copy of
            the model per pass) or ``"none"``.
        instruments: your instruments; they wrap the built-in ones (timing, memory,
            verification, progress), so their ``after_pass`` sees a verified result and their
            ``on_failure`` hears of a failed verification.
    """

    seed: int = 0
    verify: bool = True
    rtol: float = 1e-4
    probe: Tensor | None = None
    progress: bool = True
    calibration: Tensor | None = None
    rollback: Rollback = "verified"
    instruments: list[Instrument] = field(default_factory=list)
    #: (instruments, covered by a snapshot) of each manager running now, innermost last
    _running: list[tuple[list[Instrument], bool]] = field(default_factory=list, init=False, repr=False, compare=False)

    def probe_batch(self, gm: GraphModel) -> Tensor:
        if self.probe is None:
            vocab = max(gm.vocab_size, 2)
            self.probe = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(self.seed + 99))
        return self.probe

    def calibration_tokens(self, who: str, min_len: int = 1) -> Tensor:
        """The calibration tokens, checked: a clear error for ``who`` when missing or malformed."""
        tokens = self.calibration
        if tokens is None or not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] < min_len:
            raise DataError(
                f"{who} needs calibration token ids [N, L>={min_len}] in PassContext.calibration "
                "(e.g. TokenSplits.calibration(64, 512, seed=0))."
            )
        return tokens


class PassManager:
    """Runs passes in order: order check first, then each pass between its instruments' hooks."""

    def __init__(self, passes: Iterable[Pass], ctx: PassContext | None = None) -> None:
        self.passes = list(passes)
        self.ctx = ctx or PassContext()
        self.history: list[tuple[str, PassResult, dict[str, Any]]] = []
        self._instruments: list[Instrument] | None = None  # set by an enclosing Sequential
        self._covered = False  # an enclosing manager's snapshot restores whatever this one changes

    def check_order(self, established: Iterable[str] = ()) -> None:
        """Refuse a pipeline whose passes' requirements would not be met, before running anything."""
        have = set(established)
        ran: list[str] = []
        for p in self.passes:
            missing = p.requires - have
            if missing:
                before = ", ".join(ran) or "none"
                raise PassOrderError(
                    f"pass {p.name} requires {sorted(missing)}, which no earlier pass establishes "
                    f"(passes before it: {before}); add the pass that establishes it earlier in the pipeline."
                )
            have -= p.invalidates
            have |= p.establishes
            ran.append(p.name)

    def instruments(self) -> list[Instrument]:
        """The context's own instruments (outermost), then the built-in ones for this context."""
        built_in: list[Instrument] = [Timing(), Memory()]
        if self.ctx.verify:
            built_in.append(Verify())
        if self.ctx.progress:
            built_in.append(Progress())
        return list(self.ctx.instruments) + built_in

    def _needs_snapshot(self, p: Pass) -> bool:
        mode = self.ctx.rollback
        if self._covered or not p.in_place or mode == "none":
            return False
        return mode == "all" or (self.ctx.verify and p.preserves_function)

    def run(self, gm: GraphModel) -> GraphModel:
        self.check_order(gm.props)
        instruments = self._instruments if self._instruments is not None else self.instruments()
        for p in self.passes:
            missing = p.requires - gm.props
            if missing:  # a pass removed a property at run time
                raise PassOrderError(f"pass {p.name} requires {sorted(missing)}, which is not established on {gm.name}.")
            snapshot = gm.snapshot(weights=p.edits_weights) if self._needs_snapshot(p) else None
            started: list[Instrument] = []
            try:
                for ins in instruments:
                    ins.before_pass(p, gm, self.ctx)
                    started.append(ins)
                self.ctx._running.append((instruments, self._covered or snapshot is not None))
                try:
                    result = p.run(gm, self.ctx)
                finally:
                    self.ctx._running.pop()
                if not isinstance(result, PassResult):
                    raise VerificationError(f"pass {p.name} returned {type(result).__name__}, not a PassResult.")
                if result.modified:
                    result.gm.invalidate()  # cached queries (Linears, blocks...) may be stale
                record: dict[str, Any] = {}
                while started:  # innermost first; an instrument that raises is no longer started
                    record.update(started.pop().after_pass(p, result, self.ctx))
            except BaseException as exc:
                for ins in started:
                    ins.on_failure(p, exc, self.ctx)
                if snapshot is not None:
                    gm.restore(snapshot)
                    log.info("pass %s failed; %s restored to its state before the pass", p.name, gm.name)
                raise
            gm = result.gm
            gm.props -= p.invalidates
            gm.props |= p.establishes
            self.history.append((p.name, result, record))
        return gm

    def seconds(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """Seconds per pass that ran (only ``names`` if given)."""
        return {n: float(rec.get("seconds", 0.0)) for n, _, rec in self.history if names is None or n in names}

    def report(self) -> list[dict[str, Any]]:
        return [{"pass": n, "modified": r.modified, **rec, **r.stats} for n, r, rec in self.history]
