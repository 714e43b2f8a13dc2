"""Choose the fastest correct kernel for one weight by measuring it on the real shape.

For a weight ``W [out, in]`` and a token count ``T``, every candidate kernel that can
represent ``W`` on the target device/dtype is built, checked against ``F.linear`` on
an input ``x [T, in]``, and timed. The dense kernel is always measured and is the
default: a sparse kernel is chosen only when it is at least ``min_speedup`` times
faster, so noise never trades a dense layer for an equally fast sparse one.

The timer is injectable (``timer(module, x, repeats=, warmup=) -> seconds per run``) so
the choice logic can be tested deterministically; the default,
:func:`median_runtime`, synchronises CUDA and returns the median of ``repeats`` runs.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from graphprune.errors import ConfigError
from graphprune.kernels.base import KernelLinear, KernelUnavailableError, check_weight
from graphprune.kernels.dense import DenseLinear
from graphprune.kernels.packed import PackedLinear, StreamLinear
from graphprune.kernels.semi_structured import SemiStructuredLinear
from graphprune.kernels.sparse_cpu import BSRLinear, CSRLinear

#: every kernel by ``kind``; ``dense`` first (it is the reference and the fallback).
KERNELS: dict[str, type[KernelLinear]] = {
    cls.kind: cls for cls in (DenseLinear, CSRLinear, BSRLinear, SemiStructuredLinear, PackedLinear, StreamLinear)
}

Timer = Callable[..., "float | Sequence[float]"]


def median_runtime(module: KernelLinear, x: Tensor, *, repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` runs of ``module(x)`` after ``warmup`` runs."""
    cuda = x.device.type == "cuda"
    times: list[float] = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            module(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (from sysfs; 32 MiB when it cannot be read)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=32 << 20)


def cold_runtime(module: KernelLinear, x: Tensor, *, repeats: int, warmup: int) -> list[float]:
    """Seconds per call with the weight coming from memory, as a decode step reads it.

    Timing one module again and again measures a weight that sits in the cache, which
    favours kernels that compute less over kernels that read fewer bytes; a decode step
    reads every weight once per token, from memory. So the calls cycle through copies of
    ``module`` whose storage together is twice the last-level cache, and each run is one
    pass over all copies divided by their number.
    """
    size = sum(b.numel() * b.element_size() for b in module.buffers()) or 1
    count = max(1, min(512, math.ceil(2 * last_level_cache_bytes() / size)))
    copies = [module] + [copy.deepcopy(module) for _ in range(count - 1)]
    times: list[float] = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            for m in copies:
                m(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) / count)
    return times


@dataclass
class KernelReport:
    """What :func:`select_kernel` measured and chose.

    Attributes:
        choice: ``kind`` of the returned kernel.
        times: ``kind -> median seconds`` per run for every measured candidate.
        skipped: ``kind -> reason`` for candidates not measured or rejected.
        errors: ``kind -> max abs difference`` to ``F.linear`` for measured candidates.
        shape: ``(out, in)``; tokens, device and dtype as measured.
        sparsity: fraction of zeros of the weight.
    """

    choice: str
    times: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    shape: tuple[int, int] = (0, 0)
    tokens: int = 0
    device: str = "cpu"
    dtype: str = "torch.float32"
    sparsity: float = 0.0

    @property
    def speedup(self) -> float:
        """Dense time over chosen time (1.0 when dense is chosen)."""
        return self.times["dense"] / self.times[self.choice]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"speedup": self.speedup}


def _tolerance(dtype: torch.dtype, in_features: int) -> float:
    eps = torch.finfo(dtype).eps
    # Sums of `in` products reorder freely between kernels; allow a few ulps per sqrt(in) terms.
    return max(1e-5, 8.0 * float(eps) * math.sqrt(in_features))


def _resolve(candidates: Iterable[str | type[KernelLinear]] | None) -> dict[str, type[KernelLinear]]:
    if candidates is None:
        return dict(KERNELS)
    chosen: dict[str, type[KernelLinear]] = {"dense": DenseLinear}
    for cand in candidates:
        if isinstance(cand, str):
            if cand not in KERNELS:
                raise ConfigError(f"unknown kernel {cand!r}; choose from {sorted(KERNELS)}.")
            chosen[cand] = KERNELS[cand]
        elif isinstance(cand, type) and issubclass(cand, KernelLinear):
            chosen[cand.kind] = cand
        else:
            raise ConfigError(f"kernel candidates are names or KernelLinear classes, got {cand!r}.")
    return chosen


def select_kernel(
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    tokens: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    candidates: Iterable[str | type[KernelLinear]] | None = None,
    repeats: int = 20,
    warmup: int = 3,
    min_speedup: float = 1.05,
    timer: Timer | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> tuple[KernelLinear, KernelReport]:
    """Measure every applicable kernel for ``weight`` on ``x [tokens, in]`` and return the fastest.

    Args:
        weight: dense ``[out, in]`` weight (zeros where pruned).
        bias: optional ``[out]``.
        tokens: rows of the measured input (batch x sequence the layer will see).
        device, dtype: where and in which precision the kernel will run (default: the weight's).
        candidates: kernel kinds or classes to consider (dense is always added); default all.
        repeats, warmup: timed and untimed runs per candidate.
        min_speedup: a sparse kernel must beat dense by this factor to be chosen.
        timer: ``timer(module, x, repeats=, warmup=)`` returning seconds per run (a float or
            a list of runs, whose median is used); default :func:`median_runtime`.
        options: extra ``from_linear`` keyword arguments per kind, e.g. ``{"bsr": {"blocksize": 16}}``.
        seed: seed of the random measurement input.

    Returns:
        ``(module, report)``: the chosen kernel (on ``device``/``dtype``) and what was measured.

    Raises:
        ConfigError: bad arguments (unknown kernel, non-positive tokens, wrong shapes).
    """
    check_weight(weight, bias)
    if tokens < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(
            f"select_kernel needs tokens >= 1, repeats >= 1, warmup >= 0; got {tokens}, {repeats}, {warmup}."
        )
    device = torch.device(device) if device is not None else weight.device
    dtype = dtype or weight.dtype
    timer = timer or median_runtime
    options = options or {}
    w = weight.detach().to(device=device, dtype=dtype)
    b = None if bias is None else bias.detach().to(device=device, dtype=dtype)

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, w.shape[1], generator=gen).to(device=device, dtype=dtype)
    reference = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = max(1.0, reference.abs().max().item())
    tol = _tolerance(dtype, w.shape[1]) * scale

    times: dict[str, float] = {}
    skipped: dict[str, str] = {}
    errors: dict[str, float] = {}
    modules: dict[str, KernelLinear] = {}
    for kind, cls in _resolve(candidates).items():
        kwargs = dict(options.get(kind, {}))
        reason = cls.unavailable_reason(w, device=device, dtype=dtype, **kwargs)
        if reason:
            skipped[kind] = reason
            continue
        try:
            module = cls.from_linear(w, b, **kwargs)
        except KernelUnavailableError as exc:
            skipped[kind] = str(exc)
            continue
        with torch.inference_mode():
            err = (module(x).double() - reference).abs().max().item()
        errors[kind] = err
        if not err <= tol:  # also catches NaN
            skipped[kind] = f"wrong output: max abs diff {err:.3g} > tolerance {tol:.3g}"
            continue
        measured = timer(module, x, repeats=repeats, warmup=warmup)
        times[kind] = float(measured) if isinstance(measured, (int, float)) else statistics.median(measured)
        modules[kind] = module

    if "dense" not in times:  # dense is the reference; failing it means the inputs are unusable
        raise ConfigError(f"the dense kernel could not run this weight: {skipped.get('dense', 'unknown reason')}.")
    choice = "dense"
    for kind, seconds in times.items():
        if kind != "dense" and times["dense"] / seconds >= min_speedup and seconds < times[choice]:
            choice = kind
    report = KernelReport(
        choice=choice,
        times=times,
        skipped=skipped,
        errors=errors,
        shape=(int(w.shape[0]), int(w.shape[1])),
        tokens=int(tokens),
        device=str(device),
        dtype=str(dtype),
        sparsity=float((w == 0).float().mean().item()),
    )
    return modules[choice], report
