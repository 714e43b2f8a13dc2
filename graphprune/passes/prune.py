"""SequentialPrunePass: calibrate and prune one decoder block at a time.

1. The graph (with observers inserted) is split into stages; calibration micro-batches
   run through the prologue once.
2. For each block stage: its observers are switched on and the stage runs on the
   outputs of the *already pruned* previous stage; the statistics go to the solver of
   each Linear in the stage (Linears sharing an input share one Hessian); the pruned
   weights are written back; the stage runs again so the next stage sees pruned outputs.
3. Memory holds one stage's activations for the calibration set plus its statistics.
4. With a :class:`~graphprune.passes.checkpoint.StageCheckpoint`, each finished stage is
   saved; on resume, the finished prefix of stages is restored and only run forward.

The report records, per Linear, the achieved sparsity (zeros counted in the final
weight), the pattern, the layer-wise reconstruction error, and the solver's seconds;
per stage, the seconds spent.
"""
from __future__ import annotations

import difflib
import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from graphprune.distributed import Dist, current
from graphprune.errors import ConfigError, SolverError
from graphprune.graph.model import GraphModel, PackedMasks
from graphprune.graph.queries import ExpertInfo
from graphprune.graph.stages import Stage, StagedGraph, StageForward, StageRunner
from graphprune.graph.stream import ADAPTER_ATTR
from graphprune.graph.structures import ATTENTION_OPS
from graphprune.kernels.packed import load_native
from graphprune.passes.checkpoint import StageCheckpoint, StageRecord
from graphprune.passes.gradients import GradientStatsPass
from graphprune.passes.infra import Pass, PassContext, PassResult, Prop, Sequential, peak_rss_mb, release_free_memory, trim_heap
from graphprune.passes.observe import InputObserver, InsertObserversPass, RemoveObserversPass, xtx_macs
from graphprune.solvers import SparsitySpec, get_solver, reconstruction_error
from graphprune.solvers.base import LayerStats
from graphprune.solvers.refine import masked_gd_refine

log = logging.getLogger(__name__)

@dataclass
class LayerRule:
    """A per-layer override: Linears whose name matches ``pattern`` get ``spec`` (None = skip)."""

    pattern: str
    spec: SparsitySpec | None


@dataclass
class PruneConfig:
    """What to prune and how.

    Attributes:
        method: solver name (see ``graphprune.solvers.METHODS``).
        spec: default sparsity and pattern.
        rules: per-layer overrides, first match wins.
        options: extra keyword arguments for the solver (blocksize, alpha, ...).
        refine_steps: masked gradient steps after the solver (0 = none).
        batch_size: calibration sequences per forward pass.
        keep_stats: keep the statistics of every Linear in ``gm.state.stats``.
        calib_dtype: ``"float32"`` (default) or ``"bfloat16"``: the dtype the block stages'
            calibration forwards compute in (:func:`calibration_compute_dtype`). Weights,
            statistics and solvers stay float32/float64 either way.
    """

    method: str
    spec: SparsitySpec
    rules: list[LayerRule] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    refine_steps: int = 0
    batch_size: int = 8
    keep_stats: bool = False  # keep each observer's LayerStats in gm.state.stats (tests, analysis)
    calib_dtype: str = "float32"

    def __post_init__(self) -> None:
        calibration_compute_dtype(self.calib_dtype)  # an unknown name fails before anything runs

    def spec_for(self, name: str) -> SparsitySpec | None:
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return rule.spec
        return self.spec

    def check_rules(self, names: list[str]) -> None:
        """Refuse an override glob that matches none of ``names`` (a typo would silently do nothing)."""
        for rule in self.rules:
            if any(fnmatch.fnmatchcase(n, rule.pattern) for n in names):
                continue
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            near = difflib.get_close_matches(rule.pattern, names, n=3, cutoff=0.5) or [f"*.{leaf}" for leaf in leaves]
            raise ConfigError(
                f"override {rule.pattern!r} matches none of the {len(names)} prunable Linears; "
                f"nearest: {', '.join(near[:6])} (globs match the full module path, e.g. '*.down_proj')."
            )


#: ``--calib-dtype`` names -> the autocast dtype of the calibration forwards (None: as the weights are)
CALIB_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}
_WARNED_BF16: list[bool] = []


def calibration_compute_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of ``--calib-dtype name`` (None for float32), validated.

    ``bfloat16`` runs each decoder block's calibration forwards (the statistics forward and the
    propagation of the pruned block) under CPU/CUDA autocast: the Linears and attention compute
    in bfloat16 from the float32 weights, while norms, softmax and the residual stream stay
    float32, the observers accumulate ``XᵀX`` and the column norms from the activations in
    float32 products summed in float64, and the solvers run as usual. On a CPU without native
    bfloat16 arithmetic (AVX-512 BF16 or AMX) it is emulated and usually slower than float32,
    which is logged once.
    """
    if name not in CALIB_DTYPES:
        raise ConfigError(f"unknown calibration dtype {name!r}; use one of {', '.join(CALIB_DTYPES)} (e.g. --calib-dtype bfloat16).")
    dtype = CALIB_DTYPES[name]
    if dtype is torch.bfloat16 and not _WARNED_BF16 and not native_bf16_cpu():
        _WARNED_BF16.append(True)
        log.warning(
            "--calib-dtype bfloat16: this CPU has no native bfloat16 arithmetic (AVX-512 BF16 or AMX); "
            "the calibration forwards will emulate it and are likely slower than float32."
        )
    return dtype


def native_bf16_cpu() -> bool:
    """Whether this x86 CPU advertises bfloat16 dot products (``avx512_bf16`` or ``amx_bf16``);
    False where that cannot be read (not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
    return False


class StageIO(Protocol):
    """Hooks around each stage, e.g. to load a block's weights lazily and write it when done.

    ``roots`` are module trees beyond the model and the graph that hold the same parameter
    objects (the stage split), so a hook that swaps parameters can swap them everywhere.
    """

    def begin(self, roots: list[torch.nn.Module]) -> None: ...  # before the prologue runs

    def enter(self, block: int, roots: list[torch.nn.Module]) -> None: ...  # before a block stage runs

    def leave(self, block: int, roots: list[torch.nn.Module]) -> None: ...  # after it is pruned and checkpointed


def _not_pruned(gm: GraphModel, done: set[str]) -> list[dict[str, Any]]:
    """The decoder blocks' weight matrices the pass left alone (``done``: the Linears and
    experts it pruned, by name), each with why. A batched expert parameter whose experts
    were all pruned is done; one pruned in part lists each expert left alone."""
    routers = {li.param_name for li in gm.routers}
    adapters = {f"{name}.{ADAPTER_ATTR}" for name in gm.state.adapters}
    linears = {li.param_name: li.name for li in gm.linears}
    experts: dict[str, list[Any]] = {}
    for e in gm.experts:
        experts.setdefault(e.param_name, []).append(e)
    excluded = "excluded by the job's include/exclude or per-layer settings"
    out: list[dict[str, Any]] = []
    for name, p in gm.block_matrices().items():
        if name in experts:
            left = [e for e in experts[name] if e.name not in done]
            if len(left) < len(experts[name]):  # pruned in part: the experts left alone, one by one
                out.extend({"name": e.name, "shape": [e.out_features, e.in_features], "reason": excluded} for e in left)
                continue
            if not left:
                continue
        elif name in linears and linears[name] in done:
            continue
        if name in routers:
            reason = "MoE router: kept dense (pruning it changes which experts run)"
        elif name in adapters:
            reason = "adapter of a post-block norm (added by norm folding): kept dense"
        elif name in linears or name in experts:
            reason = excluded
        else:
            reason = (
                f"a {p.dim()}-D parameter that is neither an nn.Linear weight nor a batched expert weight read by "
                "a grouped matrix product: graphprune cannot prune it"
            )
        out.append({"name": name, "shape": list(p.shape), "reason": reason})
    return out


def _attention_width(gm: GraphModel) -> int | None:
    """Query heads x head_dim from the model config (the attention scores' contraction width); None if unknown."""
    cfg = getattr(gm.model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not heads:
        return None
    head_dim = getattr(cfg, "head_dim", None) or (int(getattr(cfg, "hidden_size", 0) or 0) // int(heads))
    return int(heads) * int(head_dim) if head_dim else None


def _calibration_ancestors(gm: GraphModel, observers: dict[str, Any]) -> set[Any]:
    """The graph nodes a calibration forward computes: everything the observers' inputs depend on."""
    todo = [n for n in gm.gm.graph.nodes if n.op == "call_module" and n.target in observers]
    seen: set[Any] = set()
    while todo:
        node = todo.pop()
        for src in node.all_input_nodes:
            if src not in seen:
                seen.add(src)
                todo.append(src)
    return seen


def stage_flops(gm: GraphModel, linears: list[Any], observers: dict[str, Any], tokens: int, seq_len: int) -> dict[str, float]:
    """Analytical multiply-adds of a block's two forwards on ``tokens`` tokens, and of the
    statistics its observers accumulate.

    ``propagation_macs``: the full forward, every block Linear (``tokens·in·out``) plus causal
    attention (scores and weighted values over the ``L(L+1)/2`` query-key pairs of each segment,
    ``2·pairs·heads·head_dim`` per segment). ``forward_macs``: the calibration forward, which
    computes only what the observers read (the Linears and the attention upstream of an
    observer; in a LLaMA block all but the down projection; an attention that is not a fused
    operator is counted as computed). ``statistics_macs``: per observed input, ``tokens·in`` for
    the column norms and the band-by-band upper triangle of ``XᵀX`` where it is accumulated
    (:func:`xtx_macs`).
    """
    needed = _calibration_ancestors(gm, observers)
    width = _attention_width(gm)
    attention = (tokens / seq_len) * 2.0 * (seq_len * (seq_len + 1) / 2) * width if width is not None and seq_len > 0 else 0.0
    full = float(sum(tokens * li.in_features * li.out_features for li in linears)) + attention
    calib = float(sum(tokens * li.in_features * li.out_features for li in linears if li.node in needed))
    nodes = {li.node for li in linears}
    block_attention = [n for n in _block_nodes(gm, nodes) if n.op == "call_function" and n.target in ATTENTION_OPS]
    if not block_attention or any(n in needed for n in block_attention):
        calib += attention
    stats = 0.0
    for o in observers.values():
        stats += tokens * o.in_features + (xtx_macs(o.in_features, tokens) if o.hessian else 0)
    return {"tokens": tokens, "forward_macs": int(round(calib)), "propagation_macs": int(round(full)), "statistics_macs": int(round(stats))}


def _block_nodes(gm: GraphModel, linears: set[Any]) -> list[Any]:
    """The nodes between a block's first and last Linear, in graph order."""
    order = list(gm.gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    places = [index[n] for n in linears if n in index]
    return order[min(places):max(places) + 1] if places else []


def profile_totals(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds and multiply-adds of the stage-wise calibration summed over stages, with the
    achieved rates: the forwards' (Linears and attention, the calibration and the propagation
    forward of every stage) and the statistics'. Compare ``forward_gflops`` with the machine's
    peak float32 matmul rate."""
    prof = [st["profile"] for st in stages if "profile" in st]
    if not prof:
        return {}
    tot: dict[str, Any] = {k: round(sum(p[k] for p in prof), 3) for k in ("forward_seconds", "statistics_seconds", "solve_seconds", "propagation_seconds")}
    tot["forward_gmac"] = round(sum(p["forward_macs"] for p in prof) / 1e9, 3)
    tot["statistics_gmac"] = round(sum(p["statistics_macs"] for p in prof) / 1e9, 3)
    tot["propagation_gmac"] = round(sum(p.get("propagation_macs", p["forward_macs"]) for p in prof) / 1e9, 3)
    fwd_time = tot["forward_seconds"] + tot["propagation_seconds"]
    fwd_macs = sum(p["forward_macs"] + p.get("propagation_macs", p["forward_macs"]) for p in prof)
    stat_macs = sum(p["statistics_macs"] for p in prof)
    tot["forward_gflops"] = round(2 * fwd_macs / fwd_time / 1e9, 2) if fwd_time > 0 else None  # both forwards of every stage
    tot["statistics_gflops"] = round(2 * stat_macs / tot["statistics_seconds"] / 1e9, 2) if tot["statistics_seconds"] > 0 else None
    return tot


class SequentialPrunePass(Pass):
    """Stage-wise calibration and pruning of every observed block Linear."""

    name = "sequential_prune"
    requires = frozenset({Prop.OBSERVERS})
    establishes = frozenset({Prop.CALIBRATED, Prop.PRUNED})
    preserves_function = False

    def __init__(
        self,
        config: PruneConfig,
        on_stage: Callable[[int, int, dict[str, Any]], None] | None = None,
        checkpoint: StageCheckpoint | None = None,
        dist: Dist | None = None,
        stage_io: StageIO | None = None,
    ) -> None:
        self.config = config
        self.stage_io = stage_io  # lazy loading: materialise a block before it runs, write and free it after
        self.dist = dist  # None: the current process group (single process when none)
        self.solver = get_solver(config.method)
        if self.solver.native_ops:
            load_native()  # builds once; without it the solver computes the same in Python
        self.checkpoint = checkpoint  # saves each finished stage; restores finished stages on resume
        if self.solver.needs_grad:
            self.requires = self.requires | {Prop.GRADIENTS}
        self.on_stage = on_stage

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        tokens = ctx.calibration_tokens("sequential pruning")
        observed = gm.state.observers
        self.config.check_rules(list(observed))
        units: dict[str, Any] = {li.name: li for li in gm.linears} | {e.name: e for e in gm.experts}
        for name in observed:
            spec = self.config.spec_for(name)
            if spec is not None:
                unit = units[name]
                spec.check_shape((unit.out_features, unit.in_features), name)
        experts_of: dict[int, list[ExpertInfo]] = {}
        for e in gm.experts:
            if e.name in observed and e.block is not None:
                experts_of.setdefault(e.block, []).append(e)

        dist = self.dist or current()
        staged = StagedGraph(gm)
        # each rank calibrates on its contiguous share of the micro-batches; statistics are summed
        batches = dist.shard(
            list(tokens.split(self.config.batch_size)), "calibration micro-batches",
            fix="lower --batch-size, give more --calib-samples or use fewer processes",
        )
        masks = gm.state.masks
        layers: list[dict[str, Any]] = []
        stages: list[dict[str, Any]] = []
        bar = tqdm(
            total=len(staged.block_stages), desc=f"prune {self.config.method}", unit="block",
            disable=not ctx.progress or not dist.is_main,
        )

        # only a prefix of finished stages is reused; rank 0 owns the checkpoint and decides for all
        resuming = [bool(dist.broadcast_object(self.checkpoint is not None))]

        roots: list[torch.nn.Module] = [staged.split]
        io = self.stage_io

        def prune_stage(stage: Stage, forward: StageForward) -> None:
            t0 = time.perf_counter()
            block_index = stage.block
            assert block_index is not None  # StageRunner calls back for block stages only
            if io is not None:
                io.enter(block_index, roots)
            block = gm.blocks[block_index]
            targets: list[Any] = [li for li in block.linears if li.name in observed] + experts_of.get(block_index, [])
            if resuming[0]:
                rec = self.checkpoint.load(block_index) if self.checkpoint is not None else None
                rec = dist.broadcast_object(rec)
                if rec is not None:
                    restore_stage(gm, targets, rec, masks)
                    layers.extend(rec.layers)
                    forward(last=True)  # recompute the (already pruned) outputs for the next stage
                    stages.append({**rec.stage, "resumed": True})
                    if io is not None:
                        io.leave(block_index, roots)
                    log.info("block %d: restored %d Linears from the checkpoint", block_index, len(rec.weights))
                    bar.update(1)
                    return
                resuming[0] = False
            first_layer = len(layers)
            pruned: dict[str, Tensor] = {}
            obs = {observed[li.name]: getattr(gm.gm, observed[li.name]) for li in targets}
            for o in obs.values():
                o.reset()
                o.enabled = True
            t_fwd = time.perf_counter()
            try:
                forward(observe_only=True)  # statistics only: the outputs come from the pruned block below
            finally:
                for o in obs.values():
                    o.enabled = False
            t_fwd = time.perf_counter() - t_fwd
            weight_bytes = 4 * sum(li.out_features * li.in_features for li in targets)
            trim_heap(weight_bytes)  # the statistics forward's transients, before the solvers allocate
            stats_seconds = sum(o.seconds for o in obs.values())
            local_tokens = next(iter(obs.values())).count if obs else 0
            profile = stage_flops(gm, block.linears, obs, local_tokens, int(tokens.shape[1]))
            for o in obs.values():  # same order on every rank
                o.all_reduce(dist)
            shared = {attr: o.stats(copy=False) for attr, o in obs.items() if isinstance(o, InputObserver)}
            # an expert's statistics are those of its routed rows; None when no token reached it
            stats_cache: dict[str, LayerStats | None] = {
                li.name: obs[observed[li.name]].stats(li.index) if isinstance(li, ExpertInfo) else shared[observed[li.name]]
                for li in targets
            }
            del shared
            if self.config.keep_stats:
                gm.state.stats.update({n: st for n, st in stats_cache.items() if st is not None})
            for o in obs.values():
                o.release()
            todo = [li for li in targets if self.config.spec_for(li.name) is not None]
            mine: list[dict[str, Any]] = []
            results: dict[str, tuple[Tensor, Tensor]] = {}
            t_solve = time.perf_counter()
            for index, li in enumerate(todo):
                if dist.owner(index) != dist.rank:
                    continue  # another rank solves it; its result arrives by broadcast below
                bar.set_postfix_str(li.name, refresh=False)  # the solver's progress within the block
                new, mask, entry = self._solve(gm, li, stats_cache[li.name], block_index)
                results[li.name] = (new, mask)
                mine.append(entry)
                trim_heap(8 * li.in_features**2)  # its float64 in x in workspaces, before the next solve's
            for index, li in enumerate(todo):
                if dist.active:
                    shape = (li.out_features, li.in_features)
                    new, mask = results.get(li.name) or (torch.empty(shape), torch.empty(shape, dtype=torch.bool))
                    new = dist.broadcast_(new.float().contiguous(), dist.owner(index))
                    mask = dist.broadcast_(mask.to(torch.uint8).contiguous(), dist.owner(index)).bool()
                else:
                    new, mask = results[li.name]
                gm.set_matrix(li, new)
                masks[li.name] = mask  # packed a bit per weight
                pruned[li.name] = new
            entries = {e["name"]: e for part in dist.gather_objects(mine) for e in part}
            layers.extend(entries[li.name] for li in todo)
            del stats_cache
            t_solve = time.perf_counter() - t_solve
            trim_heap(weight_bytes)  # the solvers' workspaces, before the propagation allocates
            t_prop = time.perf_counter()
            forward(last=True)  # pruned outputs feed the next stage; each batch's inputs go as it is done
            t_prop = time.perf_counter() - t_prop
            info: dict[str, Any] = {
                "stage": stage.index, "block": block_index, "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            }
            info["profile"] = {
                "forward_seconds": round(t_fwd - stats_seconds, 4),
                "statistics_seconds": round(stats_seconds, 4),
                "solve_seconds": round(t_solve, 4),
                "propagation_seconds": round(t_prop, 4),
                **profile,
            }
            stages.append(info)
            log.info("block %d: %d Linears pruned in %.2fs", block_index, len(pruned), info["seconds"])
            if self.checkpoint is not None and dist.is_main:
                self.checkpoint.save(StageRecord(block_index, pruned, {n: masks[n] for n in pruned}, layers[first_layer:], info))
            if io is not None:
                io.leave(block_index, roots)
            # this stage's statistics and old activations are garbage now (they scale with its weights)
            release_free_memory(weight_bytes)
            bar.update(1)
            if self.on_stage is not None:
                self.on_stage(block_index, len(staged.block_stages), info)

        if io is not None:
            io.begin(roots)
        try:
            StageRunner(staged, batches, calibration_compute_dtype(self.config.calib_dtype)).run(prune_stage)
        finally:
            bar.close()
        total = sum(e["sparsity"] * e["shape"][0] * e["shape"][1] for e in layers)
        numel = sum(e["shape"][0] * e["shape"][1] for e in layers)
        # every other weight matrix of the blocks counts as dense: nothing leaves the denominator
        done = {e["name"] for e in layers}
        not_pruned = _not_pruned(gm, done)
        numel += sum(int(torch.Size(e["shape"]).numel()) for e in not_pruned)
        report = {
            "method": self.config.method,
            "pattern": self.config.spec.pattern,
            "target_sparsity": self.config.spec.sparsity,
            "achieved_sparsity": total / numel if numel else 0.0,
            "not_pruned": not_pruned,
            "calibration": list(tokens.shape),
            "calibration_dtype": self.config.calib_dtype,
            "layers": layers,
            "stages": stages,
            "calibration_profile": profile_totals(stages),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        gm.state.prune_report = report
        return PassResult(gm, modified=bool(layers), stats={"achieved_sparsity": report["achieved_sparsity"], "layers": len(layers)})


    def _solve(self, gm: GraphModel, li: Any, stats: LayerStats | None, block: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Prune one Linear (or expert) from its statistics: ``(new weight, keep-mask, report entry)``.

        ``stats`` is None for an expert that no calibration token was routed to: with nothing
        to fit, it is pruned by magnitude to the same target, and its entry says so.
        """
        spec = self.config.spec_for(li.name)
        assert spec is not None
        weight = gm.matrix(li).detach().clone()  # set_matrix writes in place
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise SolverError(f"{li.name}: the weight has {bad} NaN/Inf value(s) before pruning; the model file is corrupt.")
        t1 = time.perf_counter()
        unrouted = stats is None
        if stats is None:
            stats = LayerStats(col_sq=torch.zeros(li.in_features, dtype=torch.float64), count=0)
            res = get_solver("magnitude").fn(weight, stats, spec, name=li.name)
        else:
            if self.solver.needs_grad:
                stats.grad_sq = gm.state.grad_sq[li.name]
            res = self.solver.fn(weight, stats, spec, name=li.name, **self.config.options)
        new = res.weight
        refined = self.config.refine_steps > 0 and not unrouted
        if refined:
            new = masked_gd_refine(weight, new, res.mask, stats, steps=self.config.refine_steps)
        new = torch.where(res.mask, new, torch.zeros_like(new))
        if not torch.isfinite(new).all():
            raise SolverError(f"{li.name}: solver {self.config.method} produced NaN/Inf weights.")
        entry: dict[str, Any] = {
            "name": li.name,
            "block": block,
            "shape": [li.out_features, li.in_features],
            "pattern": spec.pattern,
            "target_sparsity": round(spec.sparsity, 6),
            "sparsity": float((new == 0).sum()) / new.numel(),
            "seconds": round(time.perf_counter() - t1, 4),
        }
        if unrouted:
            entry["note"] = "no calibration token was routed to this expert: pruned by magnitude"
            return new, res.mask, entry
        if "error" in res.info and not refined:  # the solver already measured it
            entry["error"] = res.info["error"] / max(stats.count, 1)
            entry["rel_error"] = res.info["rel_error"]
        elif stats.xtx is not None:
            err, rel = reconstruction_error(weight, new, stats.xtx)
            entry["error"] = err / max(stats.count, 1)
            entry["rel_error"] = rel
        return new, res.mask, entry


def prune_pass(
    config: PruneConfig,
    *,
    hessian: bool = True,
    on_stage: Callable[[int, int, dict[str, Any]], None] | None = None,
    checkpoint: StageCheckpoint | None = None,
    stage_io: StageIO | None = None,
    dist: Dist | None = None,
) -> Sequential:
    """Calibrate-and-prune as one pass: the LM-loss gradients first for solvers that need them,
    an observer on every block Linear's input, stage-wise pruning, the observers removed.

    ``hessian`` accumulates ``XᵀX`` in the observers: the Hessian solvers and masked-gradient
    refinement need it; for the solvers that rank by column norms it only buys the report's
    layer-wise reconstruction error (``graphprune prune --layer-errors``).
    """
    prune = SequentialPrunePass(config, on_stage=on_stage, checkpoint=checkpoint, dist=dist, stage_io=stage_io)
    gradients: list[Pass] = [GradientStatsPass(dist=dist)] if prune.solver.needs_grad else []
    return Sequential([*gradients, InsertObserversPass(hessian=hessian), prune, RemoveObserversPass()], name="prune")


def restore_stage(gm: GraphModel, targets: list[Any], rec: StageRecord, masks: PackedMasks) -> None:
    """Write a checkpointed stage's weights and masks back (names and shapes must match)."""
    by_name = {li.name: li for li in targets}
    for name, weight in rec.weights.items():
        li = by_name.get(name)
        if li is None or tuple(weight.shape) != (li.out_features, li.in_features):
            raise ConfigError(
                f"the checkpoint's block {rec.block} holds {name}, which this model's block does not have "
                "with that shape; delete the checkpoint folder or run without --resume."
            )
        gm.set_matrix(li, weight)
        masks[name] = rec.masks[name]  # packed: a copy


def parse_rules(overrides: Mapping[str, Any] | None, default: SparsitySpec) -> list[LayerRule]:
    """``{"*.down_proj": 0.3, "*.q_proj": "2:4", "*.k_proj": "skip"}`` -> rules."""
    rules = []
    for pattern, value in (overrides or {}).items():
        if value is None or (isinstance(value, str) and value.strip().lower() in ("skip", "none", "dense")):
            rules.append(LayerRule(pattern, None))
        elif isinstance(value, (int, float)):
            rules.append(LayerRule(pattern, SparsitySpec.parse(float(value), "unstructured")))
        elif isinstance(value, str) and ":" in value:
            rules.append(LayerRule(pattern, SparsitySpec.parse(None, value)))
        elif isinstance(value, str) and _is_number(value):
            rules.append(LayerRule(pattern, SparsitySpec.parse(float(value))))
        else:
            raise ConfigError(f"override for {pattern!r} must be a sparsity, an 'N:M' pattern or 'skip', got {value!r}.")
    return rules


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
