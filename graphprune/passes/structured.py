"""StructuredPrunePass: remove whole MLP channels, block by block, with reconstruction.

The channel groups come from the graph (:func:`graphprune.graph.structures.find_channel_groups`:
a consumer Linear whose input is an elementwise function of producer Linears). The pass
runs the stage-wise calibration of the unstructured pruning pass: for each decoder block,
the observers on the consumers' inputs collect ``XᵀX`` (and ``Σx``) on the outputs of the
already pruned previous blocks; a structured solver
(:data:`graphprune.solvers.structured.STRUCTURED_METHODS`) picks the channels to keep and
the consumer's new weights on them; the producers lose the removed rows and the consumer
the removed columns, physically (smaller dense matrices that every runtime runs faster);
the block runs again so the next one sees the pruned outputs.

The budget is a fraction of the decoder blocks' Linear parameters. Only MLP channels are
removed, so the fraction is taken from the MLPs: each block's MLP keeps
``width - round(fraction * block_params / params_per_channel)`` channels, rounded to a
multiple of 8 for aligned matrix products. Every block then has the same width, the
config's ``intermediate_size`` is updated, and the saved folder loads in transformers.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from graphprune.errors import ConfigError
from graphprune.graph.edit import add_linear_bias, parameter_count, replace_tensor, set_config
from graphprune.graph.model import GraphModel
from graphprune.graph.stages import Stage, StagedGraph, StageRunner
from graphprune.graph.structures import ChannelGroup, find_channel_groups
from graphprune.models.shapes import SHAPES_FILE
from graphprune.passes.infra import Pass, PassContext, PassResult, Prop, Sequential, peak_rss_mb
from graphprune.passes.observe import InsertObserversPass, RemoveObserversPass, observer_for, through_observers
from graphprune.solvers.structured import channel_scores, get_structured

log = logging.getLogger(__name__)

#: config fields that hold the MLP width, by architecture (LLaMA family, OPT, GPT-2, Falcon/NeoX)
CONFIG_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")

#: how the parameter budget is spread over the blocks
BUDGETS = ("uniform", "adaptive")

#: kept widths are multiples of this (aligned matrix products), when the width allows
WIDTH_MULTIPLE = 8


def kept_width(group: ChannelGroup, fraction: float, block_params: int, multiple: int = WIDTH_MULTIPLE) -> int:
    """Channels ``group`` keeps so that its block loses ``fraction`` of its Linear parameters."""
    drop = fraction * block_params / group.params_per_channel()
    keep = group.width - drop
    if keep < 1:
        most = (group.width - 1) * group.params_per_channel() / block_params
        raise ConfigError(
            f"removing {fraction:.0%} of block {group.block}'s parameters needs more than all {group.width} channels of "
            f"{group.name}'s input; structured pruning removes MLP channels only, at most {most:.0%} of a block here. "
            "Lower --structured."
        )
    step = width_step(group, multiple)
    return max(step, int(round(keep / step)) * step)


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
    ) -> None:
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
        groups = find_channel_groups(gm, skip=skip)
        if not groups:
            raise ConfigError(
                f"{gm.name}: found no MLP channels to remove (no Linear whose input is an elementwise function of other "
                "Linears' outputs); structured pruning does not apply to this model."
            )
        if self.method == "flap" and any(g.consumer.bias is None for g in groups):
            groups = self._give_mlp_biases(gm, groups, skip)
        by_block: dict[int, list[ChannelGroup]] = {}
        for g in groups:
            by_block.setdefault(int(g.block or 0), []).append(g)
        block_params = {b.index: sum(li.out_features * li.in_features for li in b.linears) for b in gm.blocks}
        before = parameter_count(gm.model)
        staged = StagedGraph(gm)
        batches = list(tokens.split(self.batch_size))
        if self.budget == "adaptive":
            widths = self._adaptive_widths(gm, staged, batches, groups, block_params)
        else:
            widths = {g.name: kept_width(g, self.fraction, block_params[int(g.block or 0)]) for g in groups}
        layers: list[dict[str, Any]] = []
        bar = tqdm(total=len(staged.block_stages), desc=f"structured {self.method}", unit="block", disable=not ctx.progress)

        def prune_stage(stage: Stage, forward: Callable[[], list[Any]]) -> None:
            t0 = time.perf_counter()
            todo = by_block.get(int(stage.block or 0), []) if stage.block is not None else []
            if not todo:
                forward()
                bar.update(1)
                return
            obs = [observer_for(gm, g.consumer.name) for g in todo]
            for o in obs:
                o.reset()
                o.enabled = True
            try:
                forward()
            finally:
                for o in obs:
                    o.enabled = False
            for g, o in zip(todo, obs, strict=True):
                stats = o.stats()
                o.reset()
                bar.set_postfix_str(g.name, refresh=False)
                layers.append(self._apply(gm, staged, g, stats, widths[g.name]))
            forward()
            info = {"block": stage.block, "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
            bar.update(1)
            if self.on_stage is not None:
                self.on_stage(int(stage.block or 0), len(staged.block_stages), info)

        try:
            StageRunner(staged, batches).run(prune_stage)
        finally:
            bar.close()
        self._update_config(gm, groups[0].width, {entry["kept"] for entry in layers})
        after = parameter_count(gm.model)
        report = {
            "method": self.method,
            "fraction": self.fraction,
            "budget": self.budget,
            "unit": "mlp channels",
            "parameters_before": before,
            "parameters_after": after,
            "block_parameters_removed": round(
                sum(e["removed_params"] for e in layers) / max(sum(block_params.values()), 1), 6
            ),
            "layers": layers,
        }
        gm.state.structured = report
        gm.lint()
        gm.invalidate()
        log.info("%s: structured %s removed %d of %d parameters", gm.name, self.method, before - after, before)
        return PassResult(gm, modified=True, stats={"parameters_after": after, "groups": len(layers)})

    def _adaptive_widths(
        self, gm: GraphModel, staged: StagedGraph, batches: list[Any], groups: list[ChannelGroup], block_params: dict[int, int]
    ) -> dict[str, int]:
        """Per-layer widths under one global budget, from the dense model's statistics.

        One calibration pass with every consumer's observer on; each channel gets the
        importance :func:`~graphprune.solvers.structured.channel_scores` gives for the method
        (for OBS: the relative layer error of removing it alone); channels are removed in
        increasing importance, over all layers at once, until ``fraction`` of the block
        parameters is gone, each layer keeping at least ``min_keep`` (default 75 %) of the width
        the uniform budget would give it (without that floor the single-channel scores, blind
        to how removals compound, cut some layers to a tenth and the model degrades); widths
        are then rounded to multiples of 8.
        """
        observers = [observer_for(gm, g.consumer.name) for g in groups]
        for o in observers:
            o.reset()
            o.enabled = True
        try:
            def observe(stage: Stage, forward: Callable[[], list[Any]]) -> None:
                forward()

            StageRunner(staged, batches).run(observe)
        finally:
            for o in observers:
                o.enabled = False
        scored: list[tuple[float, int]] = []
        for i, (g, o) in enumerate(zip(groups, observers, strict=True)):
            scores = channel_scores(self.method, gm.get_attr(g.consumer.weight).detach(), o.stats())
            o.reset()
            scored.extend((float(v), i) for v in scores.tolist())
        scored.sort()
        budget = self.fraction * sum(block_params.values())
        uniform = {g.name: kept_width(g, self.fraction, block_params[int(g.block or 0)]) for g in groups}
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
    def _give_mlp_biases(gm: GraphModel, groups: list[ChannelGroup], skip: Callable[[Any], Any]) -> list[ChannelGroup]:
        """FLAP's compensation needs a bias on each MLP output Linear. Where the config can say
        so (LLaMA's ``mlp_bias`` gives every MLP Linear one), add zero biases to all MLP
        Linears, so the function is unchanged and the folder still loads in transformers."""
        cfg = getattr(gm.model, "config", None)
        if cfg is None or not hasattr(cfg, "mlp_bias"):
            raise ConfigError(
                f"FLAP moves the removed channels' mean output into the bias of {groups[0].name}, which has none, and "
                f"{type(gm.model).__name__}'s config cannot add one; use --structured-method obs (or wanda-sp) for this model."
            )
        for g in groups:
            for li in [*g.producers, g.consumer]:
                if li.bias is None:
                    add_linear_bias(gm, li, torch.zeros(li.out_features))
        set_config(gm.model, mlp_bias=True)
        gm.lint()
        gm.invalidate()
        return find_channel_groups(gm, skip=skip)

    @staticmethod
    def _update_config(gm: GraphModel, width: int, kept: set[int]) -> None:
        """Write the new MLP width into the config under the name the architecture uses for it."""
        cfg = getattr(gm.model, "config", None)
        getter = getattr(cfg, "get_text_config", None)
        text = getter() if callable(getter) else cfg
        key = next((k for k in CONFIG_WIDTH_KEYS if getattr(text, k, None) == width), None)
        if len(kept) == 1 and key is not None:
            set_config(gm.model, **{key: next(iter(kept))})
            return
        why = "the blocks' MLP widths differ" if len(kept) > 1 else f"the config has no MLP width field among {', '.join(CONFIG_WIDTH_KEYS)}"
        log.info("%s: %s; a saved folder records the widths in %s (graphprune loads it, transformers alone does not)", gm.name, why, SHAPES_FILE)

    def _apply(self, gm: GraphModel, staged: StagedGraph, group: ChannelGroup, stats: Any, keep: int) -> dict[str, Any]:
        t1 = time.perf_counter()
        consumer = group.consumer
        weight = gm.get_attr(consumer.weight).detach()
        choice = self.solve(weight, stats, keep, name=consumer.name, **self.options)
        idx = choice.keep
        also = [staged.split]
        for producer in group.producers:
            replace_tensor(gm, gm.get_attr(producer.weight), gm.get_attr(producer.weight).detach()[idx], also=also)
            if producer.bias is not None:
                replace_tensor(gm, gm.get_attr(producer.bias), gm.get_attr(producer.bias).detach()[idx], also=also)
        replace_tensor(gm, gm.get_attr(consumer.weight), choice.weight, also=also)
        if choice.bias_delta is not None:
            assert consumer.bias is not None  # checked in run()
            bias = gm.get_attr(consumer.bias)
            with torch.no_grad():
                bias += choice.bias_delta.to(bias.dtype)
        removed = group.width - keep
        return {
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


def structured_pass(
    fraction: float, method: str = "obs", options: dict[str, Any] | None = None, batch_size: int = 8, budget: str = "uniform"
) -> Sequential:
    """Observers on the block Linears' inputs, stage-wise structured pruning, observers removed."""
    return Sequential(
        [InsertObserversPass(hessian=True), StructuredPrunePass(fraction, method, options, batch_size, budget=budget), RemoveObserversPass()],
        name="structured",
    )


__all__ = ["BUDGETS", "CONFIG_WIDTH_KEYS", "WIDTH_MULTIPLE", "StructuredPrunePass", "kept_width", "structured_pass"]
