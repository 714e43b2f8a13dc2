"""A kernel per regime: one Linear, one kernel for decoding and one for prompts.

Decoding (1 to a few tokens per call) reads every weight once per token and is bound by
the bytes of the weights; a prompt of 128 tokens reuses each weight 128 times and is bound
by arithmetic. The fastest kernel differs: graphprune's packed kernel reads a 50 % sparse
weight in about half the bytes and wins decoding, while a dense GEMM wins prompts. So the
choice is measured per regime:

* :func:`choose_regime_kernel` times every candidate (through
  :func:`~graphprune.kernels.select_kernel`) at each token count of each regime, and keeps,
  per regime, the kernel with the least total time over that regime's counts (a sparse one
  only when it beats dense by ``min_speedup`` on that total);
* when the regimes agree, that one kernel is the Linear; when they differ, a
  :class:`RegimeLinear` holds both and dispatches on the number of input rows (the
  batch x sequence of the call): up to ``max_decode_tokens`` rows go to the decode kernel.
  It holds both storages (for a 50 % packed decode kernel next to a dense prefill one,
  1.53x the dense bytes).

A *kernel plan* (``{linear name: {"decode": kind, "prefill": kind}}`` plus
``max_decode_tokens``) is what a choice leaves behind: :func:`apply_plan` rebuilds the
same kernels from a model's dense weights without measuring again, and
:func:`write_plan` / :func:`read_plan` keep it as ``graphprune_kernels.json`` beside a
saved model folder, so the folder stays a standard model folder while graphprune
re-applies the choice when it loads it for generation (``graphprune generate`` /
``bench``). A plan records the machine it was measured on; on another machine it is
measured again.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from graphprune.errors import ConfigError
from graphprune.kernels.base import KernelLinear
from graphprune.kernels.select import KERNELS, KernelReport, Timer, cold_runtime, last_level_cache_bytes, select_kernel

log = logging.getLogger(__name__)

#: the plan file beside a saved model folder.
PLAN_FILE = "graphprune_kernels.json"
PLAN_FORMAT = 1
#: default token counts: decode at batch 1 and 8, prefill at the protocol's 128.
DECODE_TOKENS: tuple[int, ...] = (1, 8)
PREFILL_TOKENS: tuple[int, ...] = (128,)


class RegimeLinear(KernelLinear):
    """Two kernels for one weight: ``decode`` for calls of up to ``max_decode_tokens`` rows,
    ``prefill`` for longer ones.

    Eager runs and ``torch.compile`` dispatch per call (a compiled graph guards on the
    shape). A trace (``torch.jit.trace``) records the kernel of its example's regime and
    uses it at every length: a generation file traced on a short step carries the decode
    kernel, correct for prompts too, only slower on long ones.
    """

    kind = "regime"

    def __init__(self, decode: KernelLinear, prefill: KernelLinear, max_decode_tokens: int) -> None:
        if (decode.in_features, decode.out_features) != (prefill.in_features, prefill.out_features):
            raise ConfigError(
                f"RegimeLinear: decode kernel is [{decode.out_features}, {decode.in_features}] but prefill kernel is "
                f"[{prefill.out_features}, {prefill.in_features}]."
            )
        if max_decode_tokens < 1:
            raise ConfigError(f"RegimeLinear needs max_decode_tokens >= 1, got {max_decode_tokens}.")
        super().__init__(decode.in_features, decode.out_features, None)
        self.decode = decode
        self.prefill = prefill
        self.max_decode_tokens = int(max_decode_tokens)

    @property
    def kinds(self) -> dict[str, str]:
        return {"decode": self.decode.kind, "prefill": self.prefill.kind}

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return self.decode(x) if rows <= self.max_decode_tokens else self.prefill(x)

    def dense_weight(self) -> Tensor:
        return self.prefill.dense_weight()

    def to_linear(self) -> nn.Linear:
        return self.prefill.to_linear()

    def extra_repr(self) -> str:
        return f"max_decode_tokens={self.max_decode_tokens}"


def kinds_of(module: nn.Module) -> dict[str, str]:
    """``{"decode": kind, "prefill": kind}`` of a kernel (the same kind twice for a single kernel)."""
    if isinstance(module, RegimeLinear):
        return module.kinds
    kind = module.kind if isinstance(module, KernelLinear) else "dense"
    return {"decode": kind, "prefill": kind}


def kinds_label(kinds: Mapping[str, str]) -> str:
    """One kind, or ``"<decode kind>+<prefill kind>"`` when the regimes chose differently."""
    return kinds["decode"] if kinds["decode"] == kinds["prefill"] else f"{kinds['decode']}+{kinds['prefill']}"


def _best(reports: Sequence[KernelReport], min_speedup: float) -> tuple[str, dict[str, float]]:
    """The kind with the least total time over ``reports`` (dense unless a kernel beats it by ``min_speedup``)."""
    common = set.intersection(*(set(r.times) for r in reports))
    totals = {kind: sum(r.times[kind] for r in reports) for kind in common}
    choice = "dense"
    for kind, seconds in totals.items():
        if kind != "dense" and totals["dense"] / seconds >= min_speedup and seconds < totals[choice]:
            choice = kind
    return choice, totals


def build_kernel(weight: Tensor, bias: Tensor | None, kinds: Mapping[str, str], max_decode_tokens: int) -> KernelLinear:
    """The kernel (or :class:`RegimeLinear`) of a plan entry, built from a dense weight."""
    unknown = [k for k in kinds.values() if k not in KERNELS]
    if unknown:
        raise ConfigError(f"unknown kernel kind(s) {unknown} in a kernel plan; known: {sorted(KERNELS)}.")
    built = {kind: KERNELS[kind].from_linear(weight, bias) for kind in set(kinds.values())}
    if kinds["decode"] == kinds["prefill"]:
        return built[kinds["decode"]]
    return RegimeLinear(built[kinds["decode"]], built[kinds["prefill"]], max_decode_tokens)


def choose_regime_kernel(
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    decode_tokens: Sequence[int] = DECODE_TOKENS,
    prefill_tokens: Sequence[int] = PREFILL_TOKENS,
    candidates: Iterable[str] | None = None,
    repeats: int = 20,
    warmup: int = 3,
    min_speedup: float = 1.05,
    timer: Timer | None = None,
    confirm: bool = True,
    cold_repeats: int = 5,
    working_set: int | None = None,
) -> tuple[KernelLinear, dict[str, Any]]:
    """Measure the candidates at every token count and build the kernel (or pair) each regime wants.

    Args:
        weight, bias: the Linear's dense tensors (zeros where pruned).
        decode_tokens, prefill_tokens: token counts of each regime (either may be empty, not both).
        candidates, repeats, warmup, min_speedup, timer: as for :func:`select_kernel`. Without
            an injected ``timer``, decode counts are timed cold (:func:`~graphprune.kernels.select.cold_runtime`:
            cycling through copies larger than the cache, ``cold_repeats`` passes after one
            warm-up), prefill counts on one module (their weights are reused ``tokens`` times per call).
        confirm: measure dense and a sparse winner once more and keep the win only if it repeats.
        cold_repeats: timed passes of a cold measurement.
        working_set: bytes of all the weights a decode step reads (the model's Linears); when
            they fit in the last-level cache, decode reads them from the cache and is timed hot.
            None: assume they do not.

    Returns:
        ``(module, entry)``: the kernel, and a JSON-able entry with ``decode`` / ``prefill``
        (chosen kinds), ``times`` (``{tokens: {kind: seconds}}``), ``skipped``, ``shape``,
        ``sparsity`` and ``speedup`` per regime (dense time over chosen time).
    """
    counts = {"decode": tuple(int(t) for t in decode_tokens), "prefill": tuple(int(t) for t in prefill_tokens)}
    if not counts["decode"] and not counts["prefill"]:
        raise ConfigError("choose_regime_kernel needs at least one decode or prefill token count.")
    if any(t < 1 for c in counts.values() for t in c):
        raise ConfigError(f"token counts must be >= 1, got {counts}.")
    if counts["decode"] and counts["prefill"] and max(counts["decode"]) >= min(counts["prefill"]):
        raise ConfigError(f"decode token counts {counts['decode']} must all be below the prefill counts {counts['prefill']}.")

    fits_cache = working_set is not None and working_set <= last_level_cache_bytes()

    def measure(tokens: int, cands: Iterable[str] | None) -> KernelReport:
        # decode reads each weight from memory once per step: time it cold (unless a timer is injected)
        cold = timer is None and tokens in counts["decode"] and not fits_cache
        return select_kernel(
            weight, bias, tokens=tokens, candidates=cands,
            repeats=cold_repeats if cold else repeats, warmup=1 if cold else warmup,
            min_speedup=min_speedup, timer=cold_runtime if cold else timer,
        )[1]

    reports = {t: measure(t, candidates) for c in counts.values() for t in c}
    kinds: dict[str, str] = {}
    speedups: dict[str, float] = {}
    confirmed: dict[str, Any] = {}
    for regime, tokens in counts.items():
        if not tokens:
            continue
        choice, totals = _best([reports[t] for t in tokens], min_speedup)
        if choice != "dense" and confirm:
            again = [measure(t, (choice,)) for t in tokens]
            second, totals_again = _best(again, min_speedup)
            confirmed[regime] = {"kind": choice, "times": totals_again, "won_again": second == choice}
            if second != choice:
                choice, totals = "dense", totals_again
        kinds[regime] = choice
        speedups[regime] = totals["dense"] / totals[choice]
    kinds.setdefault("decode", kinds.get("prefill", "dense"))
    kinds.setdefault("prefill", kinds["decode"])
    max_decode = max(counts["decode"]) if counts["decode"] else 0
    module = build_kernel(weight, bias, kinds, max(1, max_decode))
    first = next(iter(reports.values()))
    entry: dict[str, Any] = {
        "decode": kinds["decode"],
        "prefill": kinds["prefill"],
        "max_decode_tokens": max_decode,
        "speedup": speedups,
        "times": {str(t): r.times for t, r in reports.items()},
        "skipped": {k: v for r in reports.values() for k, v in r.skipped.items()},
        "shape": list(first.shape),
        "sparsity": first.sparsity,
    }
    if confirmed:
        entry["confirm"] = confirmed
    return module, entry


# ---------------------------------------------------------------------------- plans
def machine_tag() -> dict[str, str]:
    """What a measured plan depends on: the CPU, the torch version, the threads."""
    from graphprune.kernels.packed import _cpu_tag

    return {"cpu": f"{platform.machine()}-{_cpu_tag()}", "torch": torch.__version__, "threads": str(torch.get_num_threads())}


def top_kernels(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, KernelLinear]]:
    """``(name, kernel)`` of every kernel of ``model`` that is not part of another kernel
    (the two halves of a :class:`RegimeLinear` are not listed)."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, KernelLinear):
            yield path, child
        else:
            yield from top_kernels(child, f"{path}.")


def plan_of(model: nn.Module) -> dict[str, Any]:
    """The kernel plan of a model whose Linears were rewritten (empty ``linears`` when none were)."""
    linears: dict[str, dict[str, str]] = {}
    max_decode = 0
    for name, module in top_kernels(model):
        linears[name] = kinds_of(module)
        if isinstance(module, RegimeLinear):
            max_decode = max(max_decode, module.max_decode_tokens)
    return {"format": PLAN_FORMAT, "machine": machine_tag(), "max_decode_tokens": max_decode or max(DECODE_TOKENS), "linears": linears}


def apply_plan(model: nn.Module, plan: Mapping[str, Any]) -> int:
    """Rewrite ``model``'s ``nn.Linear`` modules named in ``plan`` into the planned kernels, in place.

    Linears already holding a kernel are left as they are. A kernel that cannot be built
    here (the native library failed to build, another device) keeps the Linear dense and is
    logged once.

    Returns:
        how many Linears now run on a non-dense kernel.
    """
    if plan.get("format") != PLAN_FORMAT:
        raise ConfigError(f"kernel plan format {plan.get('format')!r} is not {PLAN_FORMAT}; measure the kernels again.")
    max_decode = int(plan.get("max_decode_tokens", max(DECODE_TOKENS)))
    unknown = sorted({k for kinds in plan.get("linears", {}).values() for k in kinds.values()} - set(KERNELS))
    if unknown:
        raise ConfigError(f"unknown kernel kind(s) {unknown} in the kernel plan; known: {sorted(KERNELS)}.")
    rewritten = 0
    failures: dict[str, str] = {}
    for name, kinds in plan.get("linears", {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"the kernel plan names {name!r}, which this model does not have; measure the kernels again.") from None
        if isinstance(module, KernelLinear):
            rewritten += module.kind != "dense"
            continue
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"the kernel plan names {name!r}, a {type(module).__name__}, not an nn.Linear.")
        if set(kinds.values()) == {"dense"}:
            continue
        try:
            kernel = build_kernel(module.weight.detach(), None if module.bias is None else module.bias.detach(), kinds, max_decode)
        except ConfigError as exc:
            failures.setdefault(str(exc), name)
            continue
        _replace(model, name, kernel)
        rewritten += 1
    for reason, name in failures.items():
        log.warning("kernel plan: keeping %s (and others with the same reason) dense: %s", name, reason)
    return rewritten


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module.requires_grad_(False))


def prunable_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules of a causal LM that hold zeros, LM head excluded."""
    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and bool((module.weight == 0).any())
    ]


def all_linears(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` module, the LM head included."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def kernelize(
    model: nn.Module,
    *,
    names: Sequence[str] | None = None,
    decode_tokens: Sequence[int] = DECODE_TOKENS,
    prefill_tokens: Sequence[int] = PREFILL_TOKENS,
    candidates: Iterable[str] | None = None,
    repeats: int = 20,
    warmup: int = 3,
    min_speedup: float = 1.05,
    timer: Timer | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure and rewrite the Linears of a loaded model (default: those with zeros, LM head excluded).

    Returns:
        the plan (see :func:`plan_of`) plus ``report``: each Linear's :func:`choose_regime_kernel` entry.
    """
    names = list(prunable_linears(model) if names is None else names)
    working_set = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    report: dict[str, Any] = {}
    for name in tqdm(names, desc="kernels", unit="linear", disable=not progress):
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"{name} is a {type(module).__name__}, not an nn.Linear; cannot choose a kernel for it.")
        kernel, entry = choose_regime_kernel(
            module.weight.detach(), None if module.bias is None else module.bias.detach(),
            decode_tokens=decode_tokens, prefill_tokens=prefill_tokens, candidates=candidates,
            repeats=repeats, warmup=warmup, min_speedup=min_speedup, timer=timer, working_set=working_set,
        )
        report[name] = entry
        if kernel.kind != "dense":
            _replace(model, name, kernel)
    plan = plan_of(model)
    if decode_tokens:
        plan["max_decode_tokens"] = max(int(t) for t in decode_tokens)
    return plan | {"report": report}


KERNEL_MODES = ("auto", "measure", "off")


def kernels_for(
    model: nn.Module,
    folder: str | Path | None = None,
    mode: str = "auto",
    *,
    linears: str = "all",
    progress: bool = True,
    **measure: Any,
) -> dict[str, Any]:
    """Give a loaded model its kernels: the plan saved in ``folder`` or a new measurement.

    Args:
        model: the causal LM (rewritten in place).
        folder: the model folder it was loaded from (for its ``graphprune_kernels.json``), or None.
        mode: ``auto`` (the saved plan when it was measured on this machine, else measure),
            ``measure`` (always measure) or ``off``.
        linears: which Linears to measure: ``all`` (dense ones and the LM head too: a dense
            weight can run faster on a decode kernel as well) or ``pruned`` (those with zeros).
        progress: a progress bar while measuring.
        measure: keyword arguments of :func:`kernelize` (token counts, candidates, timer, ...).

    Returns:
        ``{"source": "plan" | "measured" | "off" | "none", "rewritten": n, "choices": {kinds: count}}``
        (``none``: nothing to rewrite) plus ``report`` when measured.
    """
    if mode not in KERNEL_MODES:
        raise ConfigError(f"unknown kernels mode {mode!r}; choose from {list(KERNEL_MODES)}.")
    if linears not in ("all", "pruned"):
        raise ConfigError(f"linears must be 'all' or 'pruned', got {linears!r}.")
    if mode == "off":
        return {"source": "off", "rewritten": 0, "choices": {}}
    plan = read_plan(folder) if mode == "auto" and folder is not None and Path(folder).is_dir() else None
    out: dict[str, Any]
    if plan is not None:
        out = {"source": "plan", "rewritten": apply_plan(model, plan)}
    else:
        names = all_linears(model) if linears == "all" else prunable_linears(model)
        if not names:
            return {"source": "none", "rewritten": 0, "choices": {}}
        measured = kernelize(model, names=names, progress=progress, **measure)
        out = {"source": "measured", "report": measured["report"]}
        out["rewritten"] = sum(1 for k in measured["linears"].values() if set(k.values()) != {"dense"})
    counts: dict[str, int] = {}
    for kinds in plan_of(model)["linears"].values():
        label = kinds_label(kinds)
        counts[label] = counts.get(label, 0) + 1
    return out | {"choices": counts}


def write_plan(folder: str | Path, plan: Mapping[str, Any]) -> Path:
    """Write ``plan`` (without its measurement report) as ``folder/graphprune_kernels.json``."""
    path = Path(folder) / PLAN_FILE
    data = {k: v for k, v in plan.items() if k != "report"}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_plan(folder: str | Path) -> dict[str, Any] | None:
    """The plan saved beside a model folder, or None when there is none or it was measured on another machine."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        plan = cast(dict[str, Any], json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable kernel plan ({exc}); delete it to measure the kernels again.") from exc
    if plan.get("machine") != machine_tag():
        log.info("%s was measured on %s, not on this machine (%s); measuring again", path, plan.get("machine"), machine_tag())
        return None
    return plan

