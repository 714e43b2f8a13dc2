"""SlicePass: drop the least important rotated dimensions of the residual stream (SliceGPT).

After a PCA (or learned) rotation the stream's coordinates are ordered by energy, so
keeping the first ``d' = round((1 − f)·d / m)·m`` of them (``f`` the slicing fraction,
``f = 0`` keeps ``d``) turns every weight around the stream into a smaller dense matrix.
``m`` is 8 for aligned matmuls where possible, but it must be a multiple of the number of
attention heads, because transformers' configs refuse a ``hidden_size`` that the heads do
not divide even with an explicit ``head_dim`` (see :func:`slice_multiple`):

1. embeddings ``E[:, :d']``; writers ``W[:d', :]``, ``b[:d']``; readers ``W[:, :d']``;
   norm weights ``[:d']``;
2. the norms now average ``x²`` over ``d'`` instead of ``d`` channels. SliceGPT's intent is
   the original-width RMS of the truncated stream, ``x / sqrt(Σ_{i<d'} x_i² / d + ε)``. We get
   it *exactly* in a standard RMSNorm: with ``ε' = ε·d/d'``,
   ``x / sqrt(Σ x²/d' + ε') = sqrt(d/d')⁻¹ · x / sqrt(Σ x²/d + ε)``, so the readers are scaled
   by ``sqrt(d/d')`` and every norm's ``eps`` (graph constant, module attribute and config) by ``d/d'``;
3. the graph's shape constants on the stream (OPT reshapes to ``[-1, d]``) become ``d'``,
   and the Hugging Face config gets ``hidden_size = d'`` with ``head_dim`` kept explicit, so
   ``save_pretrained`` writes a loadable smaller model (LLaMA family). A sliced model
   whose stream was a LayerNorm stream is graph-only (recorded by RotatePass).

The only change in function is the removed low-energy subspace: the sliced model equals
the rotated model with the writers' rows and the embeddings' columns beyond ``d'`` set to
zero (tested). Masks recorded by an earlier prune pass are sliced along.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from graphprune.errors import ConfigError
from graphprune.graph import queries as q
from graphprune.graph.edit import add_export_blocker, parameter_count, replace_parameter, replace_tensor, set_config
from graphprune.graph.model import GraphModel
from graphprune.graph.stream import ResidualStream, find_stream
from graphprune.passes.fold_norms import untie_lm_head
from graphprune.passes.infra import Pass, PassContext, PassResult, Prop

log = logging.getLogger(__name__)
aten = torch.ops.aten



def slice_multiple(model: Any, width: int) -> int:
    """The multiple the sliced width is rounded to: 8 for aligned matmuls, but transformers'
    configs require ``hidden_size % num_attention_heads == 0`` (head_dim stays explicit), so
    ``lcm(8, heads)`` when that is at most ``width/32``, else ``heads`` (SmolLM2: 9 heads,
    lcm 72 would allow only 504/432/360 of 576, so widths are multiples of 9)."""
    heads = int(getattr(getattr(model, "config", None), "num_attention_heads", 0) or 0)
    if heads <= 0:
        return 8
    both = math.lcm(8, heads)
    return both if both <= width // 32 else heads


def sliced_width(width: int, fraction: float, multiple: int = 8) -> int:
    """``round((1 − fraction)·width / multiple)·multiple``, at least ``multiple``; ``width`` when ``fraction == 0``."""
    if not (0.0 <= fraction < 1.0) or not math.isfinite(fraction):
        raise ConfigError(f"slicing fraction must be in [0, 1), got {fraction}; e.g. --slice 0.25 drops a quarter of the stream.")
    if fraction == 0.0:
        return width
    return max(multiple, min(width, int(round((1.0 - fraction) * width / multiple)) * multiple))


class SlicePass(Pass):
    """Keep the first ``d'`` rotated dimensions of the residual stream."""

    name = "slice"
    requires = frozenset({Prop.ROTATED})
    establishes = frozenset({Prop.SLICED})
    invalidates = frozenset({Prop.CALIBRATED})
    preserves_function = False

    def __init__(self, fraction: float, multiple: int | None = None) -> None:
        sliced_width(64, fraction)  # validate early
        self.fraction = fraction
        self.multiple = multiple

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        stream = find_stream(gm)
        d = stream.width
        keep = sliced_width(d, self.fraction, self.multiple or slice_multiple(gm.model, d))
        before = parameter_count(gm.model)
        stats: dict[str, Any] = {"width": d, "sliced_width": keep, "parameters_before": before}
        if keep == d:
            stats["parameters_after"] = before
            return PassResult(gm, modified=False, stats=stats)
        rotation = gm.state.rotation or {}
        if rotation.get("importance") is None:
            raise ConfigError(
                f"slicing needs a rotation whose dimensions are ordered by importance (pca or learned), "
                f"but the stream was rotated by {rotation.get('source', 'nothing')!r}; use --rotate pca."
            )
        importance = rotation["importance"].double().clamp_min(0)
        if untie_lm_head(gm, stream):  # the head's columns are scaled, the embedding's are not
            stream = find_stream(gm)
        self._slice(gm, stream, keep)
        rotation["importance"] = rotation["importance"][:keep]
        stats["parameters_after"] = parameter_count(gm.model)
        stats["kept_energy"] = round(float(importance[:keep].sum() / importance.sum().clamp_min(1e-30)), 6)
        gm.state.slicing = dict(stats, fraction=self.fraction)
        gm.lint()
        gm.invalidate()
        log.info("%s: sliced the stream %d -> %d, parameters %d -> %d", gm.name, d, keep, before, stats["parameters_after"])
        return PassResult(gm, modified=True, stats=stats)

    @staticmethod
    def _slice(gm: GraphModel, stream: ResidualStream, keep: int) -> None:
        d = stream.width
        scale = math.sqrt(d / keep)
        done: set[int] = set()

        def cut(target: str, fn: Any) -> None:
            """Replace the parameter at ``target`` by ``fn(it)`` unless it was already cut (shared)."""
            if id(gm.get_attr(target)) not in done:
                done.add(id(replace_parameter(gm, target, fn(gm.get_attr(target).detach()))))

        masks = gm.state.masks
        for _, target in stream.embeddings:
            cut(target, lambda e: e[:, :keep])
        for li in stream.writers:
            cut(li.weight, lambda w: w[:keep, :])
            if li.bias is not None:
                cut(li.bias, lambda b: b[:keep])
            if li.name in masks:
                masks[li.name] = masks[li.name][:keep, :]
        direct = {li.node for dr in stream.direct for li in dr.readers}
        for li in stream.readers:  # a norm's readers take its rescaling; a direct reader reads the stream as it is
            factor = 1.0 if li.node in direct else scale
            cut(li.weight, lambda w, f=factor: w[:, :keep] * f)
            if li.name in masks:
                masks[li.name] = masks[li.name][:, :keep]
        # MoE experts: the batched weight [experts, out, in] (or [experts, in, out]) cut along the
        # axis that meets the stream, each expert's mask with it
        for e in stream.expert_readers:
            axis = 2 if e.transposed else 1
            cut(e.weight, lambda w, a=axis: w.narrow(a, 0, keep) * scale)
            if e.name in masks:
                masks[e.name] = masks[e.name][:, :keep]
        for e in stream.expert_writers:
            axis = 1 if e.transposed else 2
            cut(e.weight, lambda w, a=axis: w.narrow(a, 0, keep).clone())
            if e.name in masks:
                masks[e.name] = masks[e.name][:keep, :]
        eps_scale = d / keep
        for sn in stream.norms:
            norm = sn.norm
            for param in (norm.weight, norm.bias):
                if param is not None:
                    cut(param, lambda v: v[:keep])
            add = _eps_node(norm.input)
            add.args = (add.args[0], float(add.args[1]) * eps_scale)  # type: ignore[arg-type]
        # Hugging Face norm modules: eps attribute; parameters the graph no longer reads
        # (LayerNorms rewritten into RMSNorm by FoldNormsPass) are sliced too
        # norms off the stream (q/k norms inside attention, post-block norms before their adapter)
        # keep their width and eps, even when it equals the stream's (OLMo2's q_norm is d wide)
        off_stream = {ni.name for ni in gm.norms} - {sn.norm.name for sn in stream.norms}
        for path, mod in list(gm.model.named_modules()):
            if "Norm" not in type(mod).__name__ or path in off_stream:
                continue
            for attr in ("variance_epsilon", "eps"):
                if isinstance(getattr(mod, attr, None), float):
                    setattr(mod, attr, getattr(mod, attr) * eps_scale)
            for p in list(mod._parameters.values()):
                if p is not None and p.dim() == 1 and p.shape[0] == d and id(p) not in done:
                    done.add(id(p))
                    replace_tensor(gm, p, p.detach()[:keep])
        # stream shape constants: view/reshape to [..., d], on the stream and between norms and their readers
        reshaped = list(stream.nodes)
        frontier = [sn.norm.output for sn in stream.norms]
        while frontier:
            for user in frontier.pop().users:
                if user.target in q._TRANSPARENT or user.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
                    reshaped.append(user)
                    frontier.append(user)
        # and on the way from the experts' outputs to the stream (Mixtral views them [tokens, k, d])
        members = set(stream.nodes)
        frontier = list({e.node for e in stream.expert_writers})
        seen: set[Any] = set()
        while frontier:
            for user in frontier.pop().users:
                if user in members or user in seen or user.op != "call_function":
                    continue
                seen.add(user)
                reshaped.append(user)
                frontier.append(user)
        for node in reshaped:
            if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
                shape = list(node.args[1])  # type: ignore[arg-type]
                if shape and shape[-1] == d:
                    shape[-1] = keep
                    node.args = (node.args[0], shape)
        cfg = getattr(gm.model, "config", None)
        values: dict[str, Any] = {"hidden_size": keep}
        if cfg is not None:
            heads = getattr(cfg, "num_attention_heads", None)
            if getattr(cfg, "head_dim", None) is None and heads:
                values["head_dim"] = d // int(heads)
            elif getattr(cfg, "head_dim", None) is not None:
                values["head_dim"] = int(cfg.head_dim)
            for key in ("rms_norm_eps", "layer_norm_eps"):
                if isinstance(getattr(cfg, key, None), float):
                    values[key] = getattr(cfg, key) * eps_scale
            if getattr(cfg, "word_embed_proj_dim", None) == d:  # OPT
                values["word_embed_proj_dim"] = keep
        unset = set_config(gm.model, **values)
        if unset:
            add_export_blocker(
                gm, f"{type(cfg).__name__} derives {', '.join(unset)} from the width, so its config cannot state the sliced model's "
                f"{', '.join(f'{k}={values[k]}' for k in unset)}"
            )


def _eps_node(x: torch.fx.Node) -> torch.fx.Node:
    """The ``mean(x²) + eps`` node of the RMSNorm reading the stream value ``x``."""
    frontier = [x]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.target in q._TRANSPARENT:
                frontier.append(user)
            elif user.target is aten.pow.Tensor_Scalar and user.args[1] == 2:
                mean = next(iter(user.users))
                add = next(iter(mean.users))
                if mean.target is aten.mean.dim and add.target in (aten.add.Tensor, aten.add.Scalar):
                    return add
    raise ConfigError(f"no RMSNorm reads the stream value {x.name}; run FoldNormsPass before slicing.")
