"""Pass infrastructure: Pass, PassResult, PassContext, PassManager.

A pass is an object with a ``name``, the properties it ``requires`` and ``establishes``,
and whether it ``preserves_function``. The manager refuses to run a pass whose
requirements are not established (naming the pass and the passes that ran before),
lints the graph after every pass, and -- when ``verify`` is on -- checks on a probe
batch that a pass claiming to preserve function left the logits unchanged.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from graphprune.errors import PassOrderError, VerificationError
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
    KERNELS = "graph.kernels_rewritten"


@dataclass
class PassContext:
    """Scoped settings for a pipeline run.

    Attributes:
        seed: seed for every random choice a pass makes.
        verify: lint after every pass and check function-preserving passes numerically.
        rtol: relative tolerance of that check (max |Δlogits| / max |logits|).
        probe: token ids for the numerical check (a small random batch by default).
        disabled: names of passes to skip.
        progress: show progress bars.
        data: shared inputs (calibration tokens ...) keyed by name.
    """

    seed: int = 0
    verify: bool = True
    rtol: float = 1e-4
    probe: Tensor | None = None
    disabled: frozenset[str] = frozenset()
    progress: bool = True
    data: dict[str, Any] = field(default_factory=dict)

    def probe_batch(self, gm: GraphModel) -> Tensor:
        if self.probe is None:
            vocab = max(gm.vocab_size, 2)
            self.probe = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(self.seed + 99))
        return self.probe


@dataclass
class PassResult:
    """What a pass did: the (possibly new) graph, whether it changed, and a report."""

    gm: GraphModel
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement ``run``."""

    name: str = ""
    requires: frozenset[str] = frozenset()
    establishes: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()
    preserves_function: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.name:
            cls.name = cls.__name__

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def relative_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


class PassManager:
    """Runs passes in order, checking requirements and (optionally) function preservation."""

    def __init__(self, passes: Iterable[Pass], ctx: PassContext | None = None) -> None:
        self.passes = list(passes)
        self.ctx = ctx or PassContext()
        self.history: list[tuple[str, PassResult, float]] = []

    def check_order(self, established: Iterable[str] = ()) -> None:
        """Refuse a pipeline whose passes' requirements would not be met, before running anything."""
        have = set(established)
        ran: list[str] = []
        for p in self.passes:
            if p.name in self.ctx.disabled:
                continue
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

    def run(self, gm: GraphModel, callback: Callable[[Pass, PassResult], None] | None = None) -> GraphModel:
        self.check_order(gm.props)
        for p in self.passes:
            if p.name in self.ctx.disabled:
                log.info("pass %s disabled", p.name)
                continue
            missing = p.requires - gm.props
            if missing:  # a pass removed a property at run time
                raise PassOrderError(f"pass {p.name} requires {sorted(missing)}, which is not established on {gm.name}.")
            before = gm(self.ctx.probe_batch(gm)) if (self.ctx.verify and p.preserves_function) else None
            t0 = time.perf_counter()
            result = p.run(gm, self.ctx)
            seconds = time.perf_counter() - t0
            if not isinstance(result, PassResult):
                raise VerificationError(f"pass {p.name} returned {type(result).__name__}, not a PassResult.")
            gm = result.gm
            if self.ctx.verify:
                try:
                    gm.lint()
                except Exception as exc:
                    raise VerificationError(f"pass {p.name} left a malformed graph: {exc}") from exc
                if before is not None:
                    after = gm(self.ctx.probe_batch(gm))
                    diff = relative_diff(after, before) if after.shape == before.shape else float("inf")
                    if not diff <= self.ctx.rtol:
                        ran = ", ".join(n for n, _, _ in self.history) or "none"
                        raise VerificationError(
                            f"pass {p.name} claims to preserve function but changed the logits "
                            f"(relative difference {diff:.3g} > {self.ctx.rtol:g}); passes before it: {ran}."
                        )
            gm.props -= p.invalidates
            gm.props |= p.establishes
            self.history.append((p.name, result, seconds))
            log.info("pass %s: modified=%s in %.2fs", p.name, result.modified, seconds)
            if callback is not None:
                callback(p, result)
        return gm

    def report(self) -> list[dict[str, Any]]:
        return [{"pass": n, "modified": r.modified, "seconds": round(s, 3), **r.stats} for n, r, s in self.history]
