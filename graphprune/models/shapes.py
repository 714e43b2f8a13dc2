"""Model folders whose layers differ in width from what their config says.

Structured pruning with adaptive per-layer budgets leaves, say, block 3's MLP with 1024
channels and block 17's with 1408. A transformers config has one ``intermediate_size``, so
``from_pretrained`` refuses such a folder (a size mismatch on every narrowed weight). When a
model is saved, :func:`shape_overrides` compares each parameter's shape with the one the
config alone would build (instantiated on the meta device: no memory, no time) and
:data:`SHAPES_FILE` records the differences; :func:`load_with_shapes` builds the model from
the config, gives those parameters their recorded shapes and loads the weights strictly.

Removing attention heads from a model whose config cannot state the new head size (OPT
derives it from ``hidden_size / num_attention_heads``) changes the attention modules' head
counts too; :func:`attribute_overrides` records those integer attributes in the same file and
the loader sets them.

What transformers alone gives for such a folder: ``AutoModelForCausalLM.from_pretrained``
stops with a size-mismatch error (with ``ignore_mismatched_sizes=True`` it would silently
re-initialise those weights: do not). graphprune (``load_model``, and so ``eval``, ``export``,
``bench``, ``generate``) loads it exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.errors import ModelLoadError

#: written next to config.json when some parameter's shape is not the config's
SHAPES_FILE = "graphprune_shapes.json"


def _reference(model: nn.Module) -> nn.Module | None:
    """The model its config alone builds, on the meta device (None when the class cannot)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    with torch.device("meta"):
        try:
            return type(model)(config)
        except Exception:  # a model class that cannot be built from its config alone: nothing to compare with
            return None


def shape_overrides(model: nn.Module, reference: nn.Module | None = None) -> dict[str, list[int]]:
    """``parameter name -> shape`` for every parameter whose shape differs from the config's model."""
    reference = reference if reference is not None else _reference(model)
    if reference is None:
        return {}
    want = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    # the state dict, as saved: a layer kept in another layout in memory (GPT-2's Conv1D as a
    # TransposedLinear) saves in its own layout
    saved = model.state_dict(keep_vars=True)
    return {name: list(p.shape) for name, p in saved.items() if name in want and tuple(p.shape) != want[name]}


def attribute_overrides(model: nn.Module, reference: nn.Module | None = None) -> dict[str, dict[str, int]]:
    """``module path -> {attribute: value}`` for the integer attributes (head counts) that differ
    from the config's model; Linear and Embedding sizes follow from the shapes and are left out."""
    reference = reference if reference is not None else _reference(model)
    if reference is None:
        return {}
    ref = dict(reference.named_modules())
    out: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        other = ref.get(name)
        if other is None or isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        diff = {
            k: v
            for k, v in vars(module).items()
            if isinstance(v, int) and not isinstance(v, bool) and isinstance(getattr(other, k, None), int) and getattr(other, k) != v
        }
        if diff:
            out[name] = diff
    return out


def write_shapes(folder: Path, model: nn.Module) -> bool:
    """Write :data:`SHAPES_FILE` into ``folder`` when ``model`` needs one; True if written."""
    reference = _reference(model)
    shapes = shape_overrides(model, reference)
    if not shapes:
        return False
    attributes = attribute_overrides(model, reference)
    note = (
        "Parameters whose shapes, and modules whose head counts, differ from what config.json builds (per-layer widths or "
        "removed attention heads after structured pruning). graphprune's load_model builds the model with these shapes and "
        "attributes; transformers' from_pretrained alone stops with a size mismatch."
    )
    (folder / SHAPES_FILE).write_text(json.dumps({"note": note, "shapes": shapes, "attributes": attributes}, indent=1) + "\n")
    return True


def _resize(module: nn.Module, leaf: str, shape: list[int]) -> None:
    old = module._parameters[leaf]
    assert old is not None
    module._parameters[leaf] = nn.Parameter(torch.empty(shape, dtype=old.dtype), requires_grad=old.requires_grad)
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and isinstance(w, torch.Tensor):
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(module, nn.Embedding) and isinstance(w, torch.Tensor):
        module.embedding_dim = int(w.shape[1])


def load_with_shapes(path: Path, trust_remote_code: bool = False) -> Any:
    """Build the folder's model from its config, apply :data:`SHAPES_FILE`, load the weights strictly."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        recorded = json.loads((path / SHAPES_FILE).read_text())
        shapes = recorded["shapes"]
        attributes = recorded.get("attributes", {})
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"{path / SHAPES_FILE} is unreadable ({exc}); it must map parameter names to shapes.") from exc
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    for name, shape in shapes.items():
        owner, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError as exc:
            raise ModelLoadError(f"{path / SHAPES_FILE} names {name}, which {type(model).__name__} does not have.") from exc
        if leaf not in module._parameters:
            raise ModelLoadError(f"{path / SHAPES_FILE} names {name}, which {type(model).__name__} does not have.")
        _resize(module, leaf, shape)
    for owner, values in attributes.items():
        try:
            module = model.get_submodule(owner)
        except AttributeError as exc:
            raise ModelLoadError(f"{path / SHAPES_FILE} names module {owner}, which {type(model).__name__} does not have.") from exc
        for key, value in values.items():
            if not isinstance(getattr(module, key, None), int):
                raise ModelLoadError(f"{path / SHAPES_FILE} sets {owner}.{key}, which is not an integer attribute of {type(module).__name__}.")
            setattr(module, key, int(value))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ModelLoadError(f"{path}: the weights do not fit the shapes in config.json and {SHAPES_FILE}: {str(exc)[:300]}") from exc
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise ModelLoadError(
            f"{path}: the weights do not match the model built from config.json and {SHAPES_FILE} "
            f"(missing {sorted(set(missing) - tied)[:4]}, unexpected {sorted(unexpected)[:4]})."
        )
    if tied:
        model.tie_weights()
    return model.eval()


__all__ = ["SHAPES_FILE", "attribute_overrides", "load_with_shapes", "shape_overrides", "write_shapes"]
