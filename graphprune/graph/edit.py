"""Editing a captured model's weights and parameters so that the graph and the Hugging Face
model stay one program: replace a parameter (also with a new shape) everywhere it is held,
give a Linear a bias, keep module shape attributes and the config in step, and record why a
graph can no longer be saved as a model folder.

Used by the stream passes (fold, rotate, slice) and by lazy loading.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.fx import Node

from graphprune.errors import ConfigError
from graphprune.graph import queries as q
from graphprune.graph.capture import ROOT
from graphprune.graph.model import GraphModel


def own_weight_target(gm: GraphModel, node: Node, leaf: str = "weight") -> str:
    """``lm.<module of node>.<leaf>``: the attribute of the module ``node`` was traced from."""
    path = q.module_path(node)
    target = f"{ROOT}.{path}.{leaf}" if path else ""
    try:
        gm.get_attr(target)
    except AttributeError as exc:
        raise ConfigError(f"{node.name}: its module {path!r} has no parameter {leaf!r}.") from exc
    return target


def get_attr_node(gm: GraphModel, target: str) -> Node:
    """The graph's ``get_attr`` node for ``target`` (created before the first use when missing)."""
    graph = gm.gm.graph
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == target:
            return node
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        return graph.get_attr(target)


def _sync_module_shape(mod: nn.Module) -> None:
    """Keep a module's size attributes in step with its (re-shaped) parameters."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        return
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(mod, nn.Embedding):
        mod.embedding_dim = int(w.shape[1])
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = (int(w.shape[0]),)


def replace_parameter(gm: GraphModel, target: str, value: Tensor) -> nn.Parameter:
    """Put ``value`` (any shape) in place of the parameter at ``target``, everywhere it is held.

    The graph's module tree and the Hugging Face model hold the same parameter objects; the
    new parameter replaces the old one in every slot of both trees (so tied weights stay
    tied) and module size attributes (``in_features``, ``embedding_dim``...) follow.
    """
    return replace_tensor(gm, gm.get_attr(target), value)


def replace_tensor(gm: GraphModel, old: Tensor, value: Tensor, also: Iterable[nn.Module] = ()) -> nn.Parameter:
    """:func:`replace_parameter` for a parameter object (e.g. one the graph no longer reads).

    ``also``: more module trees holding the same parameter objects (a stage split).
    """
    new = nn.Parameter(value.detach().to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    trees = [gm.gm, gm.model, *also]
    for mod in [m for tree in trees for m in tree.modules()]:
        hit = False
        for key, p in mod._parameters.items():
            if p is old:
                mod._parameters[key] = new
                hit = True
        if hit:
            _sync_module_shape(mod)
    return new


def set_module_parameter(gm: GraphModel, module_path: str, leaf: str, value: Tensor) -> nn.Parameter:
    """Register a new parameter ``leaf`` on the module at ``module_path`` in both trees (unties it)."""
    new = nn.Parameter(value.detach().contiguous(), requires_grad=False)
    for root, path in ((gm.gm, f"{ROOT}.{module_path}"), (gm.model, module_path)):
        mod = root.get_submodule(path)
        if leaf in mod._parameters:
            mod._parameters[leaf] = new
        else:
            mod.register_parameter(leaf, new)
    return new


def add_linear_bias(gm: GraphModel, li: q.LinearInfo, value: Tensor) -> str:
    """Give the bias-less Linear ``li`` the bias ``value`` (graph node and HF module); returns its target."""
    if li.bias is not None:
        raise ConfigError(f"{li.name} already has a bias.")
    set_module_parameter(gm, li.name, "bias", value.to(gm.get_attr(li.weight).dtype))
    target = f"{ROOT}.{li.name}.bias"
    node = get_attr_node(gm, target)
    li.node.args = (li.node.args[0], li.node.args[1], node)
    return target


def add_export_blocker(gm: GraphModel, reason: str) -> None:
    """Record why ``gm`` can no longer be written as a Hugging Face folder."""
    if reason not in gm.state.export_blockers:
        gm.state.export_blockers.append(reason)


def export_blockers(gm: GraphModel) -> list[str]:
    return list(gm.state.export_blockers)


def text_config(model: nn.Module) -> Any:
    """The model's text config (a multimodal wrapper's language part), else its config, else None."""
    cfg = getattr(model, "config", None)
    getter = getattr(cfg, "get_text_config", None)
    return getter() if callable(getter) else cfg


def set_config(model: nn.Module, **values: Any) -> list[str]:
    """Set config attributes on the model's config and its text config (multimodal wrappers).

    Returns:
        The keys the config derives (a read-only property, such as Falcon's ``head_dim``) and
        that would now read a different value: the config cannot state them.
    """
    configs = [getattr(model, "config", None), text_config(model)]
    unset: list[str] = []
    for c in {id(c): c for c in configs if c is not None}.values():
        for key, value in values.items():
            prop = getattr(type(c), key, None)
            if isinstance(prop, property) and prop.fset is None:
                if key not in unset and getattr(c, key) != value:
                    unset.append(key)
                continue
            setattr(c, key, value)
    return unset


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters' elements (a tied table counts once)."""
    seen: dict[int, Any] = {}
    for p in model.parameters():
        seen[id(p)] = p
    return sum(p.numel() for p in seen.values())
