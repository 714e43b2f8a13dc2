"""Data-parallel pruning on ``torch.distributed``: who am I, what is my share, combine.

graphprune runs the same pipeline in every process (launched by ``torchrun``); the
processes split the work and combine it with torch.distributed collectives:

* calibration micro-batches are split into contiguous shares, one per rank; each rank
  runs the stage on its share and the statistics (Hessians, column norms, token counts,
  gradient accumulators) are summed with ``all_reduce``;
* the Linears of a stage are solved round-robin across ranks and each result is
  broadcast from the rank that computed it, so every rank holds identical weights;
* evaluation windows are split the same way and the summed NLL is reduced;
* only rank 0 writes files and shows progress.

A :class:`Dist` with ``world == 1`` (the default when no process group exists) makes every
operation a no-op, so the single-process path runs exactly the same code.

The gloo backend works on CPU tensors; with nccl each collective moves its tensor to the
process's CUDA device (``LOCAL_RANK``) and back.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor

from graphprune.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    backend: str = "none"

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- work split
    def bounds(self, n: int) -> tuple[int, int]:
        """``[lo, hi)`` of this rank's contiguous share of ``n`` items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def shard(self, items: Sequence[T], what: str = "items", fix: str = "") -> list[T]:
        """This rank's contiguous share of ``items``; every rank must get at least one."""
        if self.active and len(items) < self.world:
            raise ConfigError(
                f"{self.world} processes need at least {self.world} {what}, got {len(items)}; "
                f"{fix or 'use fewer processes'}."
            )
        lo, hi = self.bounds(len(items))
        return list(items[lo:hi])

    def owner(self, index: int) -> int:
        """The rank that computes work item ``index`` (round-robin)."""
        return index % self.world

    # ---------------------------------------------------------------- collectives
    def _device(self) -> torch.device | None:
        if self.backend == "nccl":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return None

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks, in place; returns ``t``."""
        if not self.active:
            return t
        dev = self._device()
        buf = t if dev is None else t.to(dev)
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf.cpu())
        return t

    def all_reduce_float(self, value: float) -> float:
        """Sum a Python number over ranks (in float64)."""
        if not self.active:
            return value
        return float(self.all_reduce_(torch.tensor([value], dtype=torch.float64)).item())

    def broadcast_(self, t: Tensor, src: int) -> Tensor:
        """Overwrite ``t`` on every rank with ``src``'s ``t``, in place; returns ``t``."""
        if not self.active:
            return t
        dev = self._device()
        if not t.is_contiguous():
            raise ValueError("broadcast_ needs a contiguous tensor")
        buf = t if dev is None else t.to(dev)
        tdist.broadcast(buf, src=src)
        if buf is not t:
            t.copy_(buf.cpu())
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``src``'s ``obj`` (picklable) on every rank."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()


_SINGLE = Dist()


def current() -> Dist:
    """The :class:`Dist` of the initialised default process group, or the single-process one."""
    if tdist.is_available() and tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(), str(tdist.get_backend()))
    return _SINGLE


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str | None = None) -> Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); else stay single.

    Args:
        backend: "gloo" or "nccl"; default nccl when CUDA is available, else gloo.
    """
    if tdist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return _SINGLE
    if not tdist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run graphprune without torchrun.")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"unknown distributed backend {backend!r}; use gloo (CPU) or nccl (CUDA).")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend)
    d = current()
    log.info("process %d of %d (%s)", d.rank, d.world, d.backend)
    return d


def shutdown(barrier: bool = True) -> None:
    """Leave the process group if one was joined (after a final barrier unless a rank failed)."""
    if tdist.is_available() and tdist.is_initialized():
        if barrier:
            tdist.barrier()
        tdist.destroy_process_group()
