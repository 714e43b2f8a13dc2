"""StructuredPrunePass: remove whole MLP channels and attention heads, block by block, with reconstruction.

The structures come from the graph: MLP channels from
:func:`graphprune.graph.structures.find_channel_groups` (a consumer Linear whose input is an
elementwise function of producer Linears), attention heads from
:func:`~graphprune.graph.structures.find_head_groups` (query/key/value Linears feeding a fused
attention whose output reaches the output projection). The pass
runs the stage-wise calibration of the unstructured pruning pass: for each decoder block,
the observers on the consumers' inputs collect ``XᵀX`` (and ``Σx``) on the outputs of the
already pruned previous blocks; a structured solver
(:data:`graphprune.solvers.structured.STRUCTURED_METHODS`) picks the channels to keep and
the consumer's new weights on them; the producers lose the removed rows and the consumer
the removed columns, physically (smaller dense matrices that every runtime runs faster);
the block runs again so the next one sees the pruned outputs.

The budget is a fraction of the decoder blocks' Linear parameters; ``units`` says what may
go (:data:`UNITS`):

* ``mlp`` (default): the fraction is taken from the MLPs: each block's MLP keeps
  ``width - round(fraction * block_params / params_per_channel)`` channels, rounded to a
  multiple of 8 for aligned matrix products.
* ``heads``: query heads; with grouped-query attention each KV head keeps the same number of
  query heads (at least one), so the attention stays a grouped-query attention; without it
  (one query head per KV head) a head takes its key and value rows along.
* ``kv-groups``: whole KV groups: a KV head, its key and value rows and all its query heads
  (the KV cache shrinks too).
* ``mlp+heads``, ``mlp+kv-groups``: the attention gives up ``fraction`` of its own
  parameters (rounded to whole heads, possibly none) and the MLP the rest of the block's share.

For heads the solver works on the output projection's columns, one head (``head_dim``
columns) or one KV group as a unit. Head counts are the same in every block; with the
uniform budget so are MLP widths, the config's sizes are updated (``intermediate_size``;
``num_attention_heads``, ``num_key_value_heads`` and an explicit ``head_dim`` where the config
has a ``head_dim`` field) and the saved folder loads in transformers. Where the config cannot
say it (OPT derives the head size from ``hidden_size / num_attention_heads``) the attention
modules' head counts are set and the folder records them for graphprune's loader.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from graphprune.errors import ConfigError, VerificationError
from graphprune.graph.edit import add_linear_bias, parameter_count, replace_tensor, set_config, text_config
from graphprune.graph.model import GraphModel
from graphprune.graph.stages import Stage, StagedGraph, StageForward, StageRunner
from graphprune.graph.structures import ChannelGroup, HeadGroup, find_channel_groups, find_head_groups
from graphprune.models.shapes import SHAPES_FILE
from graphprune.passes.infra import Pass, PassContext, PassResult, Prop, Sequential, peak_rss_mb, release_free_memory, trim_heap
from graphprune.passes.observe import InsertObserversPass, RemoveObserversPass, observer_for, through_observers
from graphprune.solvers.structured import channel_scores, get_structured

log = logging.getLogger(__name__)

#: config fields that hold the MLP width, by architecture (LLaMA family, OPT, GPT-2, Falcon/NeoX)
CONFIG_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")

#: how the parameter budget is spread over the blocks
BUDGETS = ("uniform", "adaptive")

#: kept widths are multiples of this (aligned matrix products), when the width allows
WIDTH_MULTIPLE = 8

#: what structured pruning may remove (``--structured-units``)
UNITS = ("mlp", "heads", "kv-groups", "mlp+heads", "mlp+kv-groups")


def parse_units(units: str) -> tuple[str, ...]:
    """``"mlp+heads"`` (or ``"mlp,heads"``) -> ``("mlp", "heads")``, checked against :data:`UNITS`."""
    order = ("mlp", "heads", "kv-groups")
    given = {u.strip() for u in units.replace(",", "+").split("+") if u.strip()}
    parts = tuple(u for u in order if u in given)
    if given - set(order) or "+".join(parts) not in UNITS:
        raise ConfigError(f"--structured-units {units!r} is not one of {', '.join(UNITS)}.")
    return parts


def kept_width(group: ChannelGroup, fraction: float, block_params: int, multiple: int = WIDTH_MULTIPLE, removed: float = 0.0) -> int:
    """Channels ``group`` keeps so that its block loses ``fraction`` of its Linear parameters
    (``removed`` of them already gone with attention heads)."""
    drop = (fraction * block_params - removed) / group.params_per_channel()
    keep = group.width - drop
    if keep < 1:
        most = ((group.width - 1) * group.params_per_channel() + removed) / block_params
        raise ConfigError(
            f"removing {fraction:.0%} of block {group.block}'s parameters needs more than all {group.width} channels of "
            f"{group.name}'s input; with these units at most {most:.0%} of a block can go here. "
            "Lower --structured or add units (--structured-units mlp+heads)."
        )
    step = width_step(group, multiple)
    return max(step, min(group.width, int(round(keep / step)) * step))


def head_plan(group: HeadGroup, units: tuple[str, ...], fraction: float, block_params: int) -> tuple[str, int, int]:
    """``(unit, units removed, parameters removed)`` for one attention under the uniform budget.

    ``unit`` is ``head`` (query heads, the same number from every KV group) or ``kv-group``.
    With the MLP also in ``units`` the attention gives up ``fraction`` of its own parameters,
    rounded to whole units (possibly none); alone it gives up ``fraction`` of the block's."""
    per_group = "heads" in units and group.rep > 1
    unit = "head" if per_group else "kv-group"
    size = group.params_per_query_head() if per_group else group.params_per_kv_group()
    step = group.kv_heads if per_group else 1  # query heads go evenly from every KV group
    most = group.kv_heads * (group.rep - 1) if per_group else group.kv_heads - 1
    attn = sum(li.out_features * li.in_features for li in (*group.producers, group.consumer))
    target = fraction * (attn if "mlp" in units else block_params)
    n = int(round(target / (size * step))) * step
    if "mlp" not in units and n > most:
        raise ConfigError(
            f"removing {fraction:.0%} of block {group.block}'s parameters needs more than the {most} {unit}s of {group.name} "
            f"that can go (each KV group keeps a query head); at most {most * size / block_params:.0%} here. "
            "Lower --structured or use --structured-units mlp+heads."
        )
    n = min(n, most)
    return unit, n, n * size


def width_step(group: ChannelGroup, multiple: int = WIDTH_MULTIPLE) -> int:
    """Kept widths are multiples of ``multiple``, unless the group is too narrow for that (then 1)."""
    return multiple if group.width >= 4 * multiple else 1


class StructuredPrunePass(Pass):
    """Stage-wise removal of MLP channels with a structured solver."""

    name = "structured_prune"
    requires = frozenset({Prop.OBSERVERS})
    establishes = frozenset({Prop.CALIBRATED, Prop.STRUCTURED})
    invalidates = frozenset({Prop.CALIBRATED})
    preserves_function = False

    def __init__(
        self,
        fraction: float,
        method: str = "obs",
        options: dict[str, Any] | None = None,
        batch_size: int = 8,
        on_stage: Callable[[int, int, dict[str, Any]], None] | None = None,
        budget: str = "uniform",
        min_keep: float = 0.75,
        units: str = "mlp",
    ) -> None:
        self.units = parse_units(units)
        if budget not in BUDGETS:
            raise ConfigError(f"unknown structured budget {budget!r}; choose one of {', '.join(BUDGETS)}.")
        self.budget = budget
        self.min_keep = min_keep
        if not (0.0 < fraction < 1.0):
            raise ConfigError(f"--structured must be a fraction of the block parameters in (0, 1), got {fraction}; e.g. --structured 0.2.")
        self.solve = get_structured(method)
        self.fraction = fraction
        self.method = method
        self.options = dict(options or {})
        self.batch_size = batch_size
        self.on_stage = on_stage

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        tokens = ctx.calibration_tokens("structured pruning")
        skip = through_observers(gm)
        groups: list[ChannelGroup] = []
        heads: list[HeadGroup] = []
        if "mlp" in self.units:
            groups = find_channel_groups(gm, skip=skip)
            if not groups:
                raise ConfigError(
                    f"{gm.name}: found no MLP channels to remove (no Linear whose input is an elementwise function of other "
                    "Linears' outputs); structured pruning of the MLP does not apply to this model."
                )
        if self.units != ("mlp",):
            heads = find_head_groups(gm, skip=skip)
            if not heads:
                raise ConfigError(
                    f"{gm.name}: found no attention heads to remove (a fused attention whose query, key and value come from "
                    "Linears through reshapes and rotary embeddings, and whose output feeds one Linear); use --structured-units mlp."
                )
        if self.method == "flap" and any(g.consumer.bias is None for g in groups):
            groups = self._give_biases(gm, groups, skip, "mlp_bias", find_channel_groups)
        if self.method == "flap" and any(g.consumer.bias is None for g in heads):
            heads = self._give_biases(gm, heads, skip, "attention_bias", find_head_groups)
        by_block: dict[int, list[ChannelGroup | HeadGroup]] = {}
        every: list[ChannelGroup | HeadGroup] = [*heads, *groups]
        for g in every:
            by_block.setdefault(int(g.block or 0), []).append(g)
        block_params = {b.index: sum(li.out_features * li.in_features for li in b.linears) for b in gm.blocks}
        before = parameter_count(gm.model)
        staged = StagedGraph(gm)
        batches = list(tokens.split(self.batch_size))
        plans = {h.name: head_plan(h, self.units, self.fraction, block_params[int(h.block or 0)]) for h in heads}
        gone = {int(h.block or 0): float(plans[h.name][2]) for h in heads}
        if self.budget == "adaptive" and groups:
            widths = self._adaptive_widths(gm, staged, batches, groups, block_params, sum(gone.values()))
        else:
            widths = {g.name: kept_width(g, self.fraction, block_params[int(g.block or 0)], removed=gone.get(int(g.block or 0), 0.0)) for g in groups}
        layers: list[dict[str, Any]] = []
        bar = tqdm(total=len(staged.block_stages), desc=f"structured {self.method}", unit="block", disable=not ctx.progress)

        def prune_stage(stage: Stage, forward: StageForward) -> None:
            t0 = time.perf_counter()
            todo = by_block.get(int(stage.block or 0), []) if stage.block is not None else []
            if not todo:
                forward(last=True)
                bar.update(1)
                return
            obs = [observer_for(gm, g.consumer.name) for g in todo]
            for o in obs:
                o.reset()
                o.enabled = True
            try:
                forward(observe_only=True)
            finally:
                for o in obs:
                    o.enabled = False
            trim_heap(4 * block_params[int(stage.block or 0)])  # the statistics forward's transients
            for g, o in zip(todo, obs, strict=True):
                stats = o.stats(copy=False)
                o.release()
                bar.set_postfix_str(g.name, refresh=False)
                if isinstance(g, HeadGroup):
                    layers.append(self._apply_heads(gm, staged, stage, g, stats, plans[g.name]))
                else:
                    layers.append(self._apply(gm, staged, g, stats, widths[g.name]))
            trim_heap(4 * block_params[int(stage.block or 0)])  # the solvers' workspaces, before the propagation
            forward(last=True)
            info = {"block": stage.block, "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
            # the removed rows, statistics and old activations are garbage now (they scale with the block's weights)
            release_free_memory(4 * block_params[int(stage.block or 0)])
            bar.update(1)
            if self.on_stage is not None:
                self.on_stage(int(stage.block or 0), len(staged.block_stages), info)

        try:
            StageRunner(staged, batches).run(prune_stage)
        finally:
            bar.close()
        mlp_layers = [e for e in layers if e["kind"] == "mlp"]
        if groups:
            self._update_config(gm, groups[0].width, {entry["kept"] for entry in mlp_layers})
        if heads:
            self._update_head_config(gm, heads, [e for e in layers if e["kind"] == "heads"])
        after = parameter_count(gm.model)
        report = {
            "method": self.method,
            "fraction": self.fraction,
            "budget": self.budget,
            "unit": "+".join(self.units),
            "parameters_before": before,
            "parameters_after": after,
            "block_parameters_removed": round(sum(e["removed_params"] for e in layers) / max(sum(block_params.values()), 1), 6),
            "layers": layers,
        }
        gm.state.structured = report
        gm.lint()
        gm.invalidate()
        log.info("%s: structured %s removed %d of %d parameters", gm.name, self.method, before - after, before)
        return PassResult(gm, modified=True, stats={"parameters_after": after, "groups": len(layers)})

    def _adaptive_widths(
        self, gm: GraphModel, staged: StagedGraph, batches: list[Any], groups: list[ChannelGroup], block_params: dict[int, int], heads_gone: float = 0.0
    ) -> dict[str, int]:
        """Per-layer widths under one global budget, from the dense model's statistics.

        One calibration pass with every consumer's observer on; each channel gets the
        importance :func:`~graphprune.solvers.structured.channel_scores` gives for the method
        (for OBS: the relative layer error of removing it alone); channels are removed in
        increasing importance, over all layers at once, until ``fraction`` of the block
        parameters is gone, each layer keeping at least ``min_keep`` (default 75 %) of the width
        the uniform budget would give it (without that floor the single-channel scores, blind
        to how removals compound, cut some layers to a tenth and the model degrades); widths
        are then rounded to multiples of 8. Attention heads (``heads_gone`` parameters) are
        removed uniformly and count against the same budget.
        """
        observers = [observer_for(gm, g.consumer.name) for g in groups]
        for o in observers:
            o.reset()
            o.enabled = True
        try:

            def observe(stage: Stage, forward: StageForward) -> None:
                forward(last=True)

            StageRunner(staged, batches).run(observe)
        finally:
            for o in observers:
                o.enabled = False
        scored: list[tuple[float, int]] = []
        for i, (g, o) in enumerate(zip(groups, observers, strict=True)):
            scores = channel_scores(self.method, gm.get_attr(g.consumer.weight).detach(), o.stats(copy=False))
            o.release()
            scored.extend((float(v), i) for v in scores.tolist())
        scored.sort()
        budget = self.fraction * sum(block_params.values()) - heads_gone
        share = heads_gone / max(len(groups), 1)
        uniform = {g.name: kept_width(g, self.fraction, block_params[int(g.block or 0)], removed=share) for g in groups}
        steps = [width_step(g) for g in groups]
        floor = [max(step, int(math.ceil(self.min_keep * uniform[g.name] / step)) * step) for g, step in zip(groups, steps, strict=True)]
        removed = [0] * len(groups)
        gone = 0.0
        for _, i in scored:
            if gone >= budget:
                break
            if groups[i].width - removed[i] > floor[i]:
                removed[i] += 1
                gone += groups[i].params_per_channel()
        if gone < budget:
            raise ConfigError(
                f"removing {self.fraction:.0%} of the block parameters needs more than the MLP channels above the "
                f"floor of {self.min_keep:.0%} of the uniform width per layer; structured pruning removes MLP channels only. Lower --structured."
            )
        widths = {}
        for g, r, low, step in zip(groups, removed, floor, steps, strict=True):
            widths[g.name] = min(g.width, max(low, int(round((g.width - r) / step)) * step))
        log.info("adaptive MLP widths: %s", ", ".join(str(w) for w in widths.values()))
        return widths

    @staticmethod
    def _give_biases(gm: GraphModel, groups: list[Any], skip: Callable[[Any], Any], flag: str, find: Callable[..., list[Any]]) -> list[Any]:
        """FLAP's compensation needs a bias on each output Linear. Where the config can say so
        (LLaMA's ``mlp_bias`` gives every MLP Linear one, ``attention_bias`` every attention
        Linear), add zero biases to all of the structure's Linears, so the function is
        unchanged and the folder still loads in transformers."""
        cfg = getattr(gm.model, "config", None)
        if cfg is None or not hasattr(cfg, flag):
            raise ConfigError(
                f"FLAP moves the removed channels' mean output into the bias of {groups[0].name}, which has none, and "
                f"{type(gm.model).__name__}'s config cannot add one; use --structured-method obs (or wanda-sp) for this model."
            )
        for g in groups:
            for li in [*g.producers, g.consumer]:
                if li.bias is None:
                    add_linear_bias(gm, li, torch.zeros(li.out_features))
        set_config(gm.model, **{flag: True})
        gm.lint()
        gm.invalidate()
        return find(gm, skip=skip)

    @staticmethod
    def _update_config(gm: GraphModel, width: int, kept: set[int]) -> None:
        """Write the new MLP width into the config under the name the architecture uses for it."""
        text = text_config(gm.model)
        key = next((k for k in CONFIG_WIDTH_KEYS if getattr(text, k, None) == width), None)
        if len(kept) == 1 and key is not None:
            set_config(gm.model, **{key: next(iter(kept))})
            return
        why = "the blocks' MLP widths differ" if len(kept) > 1 else f"the config has no MLP width field among {', '.join(CONFIG_WIDTH_KEYS)}"
        log.info("%s: %s; a saved folder records the widths in %s (graphprune loads it, transformers alone does not)", gm.name, why, SHAPES_FILE)

    @staticmethod
    def _shrink(gm: GraphModel, staged: StagedGraph, producers: list[tuple[Any, torch.Tensor]], consumer: Any, choice: Any) -> None:
        """Keep ``rows`` of each producer (weight and bias), give the consumer the solver's
        weight on the kept columns and add its bias compensation, in the graph, the model and
        the stage split at once."""
        also = [staged.split]
        for li, rows in producers:
            replace_tensor(gm, gm.get_attr(li.weight), gm.get_attr(li.weight).detach()[rows], also=also)
            if li.bias is not None:
                replace_tensor(gm, gm.get_attr(li.bias), gm.get_attr(li.bias).detach()[rows], also=also)
        replace_tensor(gm, gm.get_attr(consumer.weight), choice.weight, also=also)
        if choice.bias_delta is not None:
            assert consumer.bias is not None  # run() gives every consumer a bias for FLAP
            bias = gm.get_attr(consumer.bias)
            with torch.no_grad():
                bias += choice.bias_delta.to(bias.dtype)

    def _apply(self, gm: GraphModel, staged: StagedGraph, group: ChannelGroup, stats: Any, keep: int) -> dict[str, Any]:
        t1 = time.perf_counter()
        consumer = group.consumer
        weight = gm.get_attr(consumer.weight).detach()
        choice = self.solve(weight, stats, keep, name=consumer.name, **self.options)
        self._shrink(gm, staged, [(p, choice.keep) for p in group.producers], consumer, choice)
        removed = group.width - keep
        return {
            "kind": "mlp",
            "name": consumer.name,
            "producers": [p.name for p in group.producers],
            "block": group.block,
            "width": group.width,
            "kept": keep,
            "removed_params": removed * group.params_per_channel(),
            "error": choice.info.get("error"),
            "rel_error": choice.info.get("rel_error"),
            "swaps": choice.info.get("swaps"),
            "seconds": round(time.perf_counter() - t1, 4),
        }

    def _apply_heads(self, gm: GraphModel, staged: StagedGraph, stage: Stage, group: HeadGroup, stats: Any, plan: tuple[str, int, int]) -> dict[str, Any]:
        """Remove ``plan``'s heads: the solver picks them on the output projection's columns
        (one unit per head or per KV group) and refits the rest; the query (and, for KV groups,
        key and value) rows go; the graph's head-count constants and the attention module follow."""
        t1 = time.perf_counter()
        unit, removed, removed_params = plan
        hd, rep = group.head_dim, group.rep
        consumer = group.consumer
        weight = gm.get_attr(consumer.weight).detach()
        if unit == "head":
            units = torch.arange(group.heads * hd).view(group.heads, hd)
            parents: torch.Tensor | None = torch.arange(group.heads) // rep
        else:
            units = torch.arange(group.heads * hd).view(group.kv_heads, rep * hd)
            parents = None
        n_units = units.shape[0]
        if removed == 0:
            kept_units = list(range(n_units))
            choice = None
        else:
            choice = self.solve(weight, stats, n_units - removed, name=consumer.name, units=units, parents=parents, **self.options)
            kept_units = sorted(choice.info["kept_units"])
        if unit == "head":
            kept_heads, kept_kv = kept_units, list(range(group.kv_heads))
        else:
            kept_heads = [g * rep + r for g in kept_units for r in range(rep)]
            kept_kv = kept_units
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kept_heads])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kept_kv])
        if choice is not None:
            rows = [(li, r) for li, r in ((group.query, q_rows), (group.key, kv_rows), (group.value, kv_rows)) if r.numel() != li.out_features]
            self._shrink(gm, staged, rows, consumer, choice)
            nq, nkv = len(kept_heads), len(kept_kv)
            counts = {"q": nq, "kv": nkv, "rep": nq // nkv, "qd": nq * hd, "kvd": nkv * hd}
            self._set_head_constants(gm, staged, stage, group, counts)
            attention = gm.model.get_submodule(group.module) if group.module else None
            for attr, value in (("num_heads", nq), ("num_attention_heads", nq), ("num_key_value_heads", nkv), ("num_key_value_groups", nq // nkv)):
                if attention is not None and isinstance(getattr(attention, attr, None), int):
                    setattr(attention, attr, value)
        return {
            "kind": "heads",
            "name": consumer.name,
            "producers": [p.name for p in group.producers],
            "block": group.block,
            "unit": unit,
            "heads": group.heads,
            "kv_heads": group.kv_heads,
            "kept_heads": kept_heads,
            "kept_kv_heads": kept_kv,
            "head_dim": hd,
            "width": group.heads * hd,
            "kept": len(kept_heads) * hd,
            "removed_params": removed_params,
            "error": None if choice is None else choice.info.get("error"),
            "rel_error": 0.0 if choice is None else choice.info.get("rel_error"),
            "swaps": None if choice is None else choice.info.get("swaps"),
            "seconds": round(time.perf_counter() - t1, 4),
        }

    @staticmethod
    def _set_head_constants(gm: GraphModel, staged: StagedGraph, stage: Stage, group: HeadGroup, counts: dict[str, int]) -> None:
        """Rewrite the head-count constants of the graph and of the running stage's copy of it."""
        for node, index, what in group.edits:
            copy = staged.copies.get(node)
            if copy is None:
                raise VerificationError(f"{group.name}: the stage being pruned has no copy of {node.name}; cannot change its head count.")
            for target in (node, copy):
                old = target.args[1]
                assert isinstance(old, (list, tuple))  # checked when the group was found
                shape = list(old)
                shape[index] = counts[what]
                target.args = (target.args[0], shape, *target.args[2:])
        stage.module.recompile()
        gm.gm.recompile()

    @staticmethod
    def _update_head_config(gm: GraphModel, groups: list[HeadGroup], layers: list[dict[str, Any]]) -> None:
        """Write the new head counts into a LLaMA-style config (one with a ``head_dim`` field)."""
        text = text_config(gm.model)
        counts = {(len(e["kept_heads"]), len(e["kept_kv_heads"])) for e in layers}
        if len(counts) == 1 and text is not None and hasattr(text, "head_dim") and hasattr(text, "num_key_value_heads"):
            nq, nkv = next(iter(counts))
            set_config(gm.model, num_attention_heads=nq, num_key_value_heads=nkv, head_dim=groups[0].head_dim)
            return
        log.info(
            "%s: the config cannot state the new head counts; a saved folder records them in %s (graphprune loads it, transformers alone does not)",
            gm.name,
            SHAPES_FILE,
        )


def structured_pass(
    fraction: float,
    method: str = "obs",
    options: dict[str, Any] | None = None,
    batch_size: int = 8,
    budget: str = "uniform",
    units: str = "mlp",
) -> Sequential:
    """Observers on the block Linears' inputs, stage-wise structured pruning, observers removed."""
    return Sequential(
        [
            InsertObserversPass(hessian=True),
            StructuredPrunePass(fraction, method, options, batch_size, budget=budget, units=units),
            RemoveObserversPass(),
        ],
        name="structured",
    )


__all__ = ["BUDGETS", "CONFIG_WIDTH_KEYS", "UNITS", "WIDTH_MULTIPLE", "StructuredPrunePass", "head_plan", "kept_width", "parse_units", "structured_pass"]
