"""Model folders whose layers differ in width from what their config says.

Structured pruning with adaptive per-layer budgets leaves, say, block 3's MLP with 1024
channels and block 17's with 1408. A transformers config has one ``intermediate_size``, so
``from_pretrained`` refuses such a folder (a size mismatch on every narrowed weight). When a
model is saved, :func:`shape_overrides` compares each parameter's shape with the one the
config alone would build (instantiated on the meta device: no memory, no time) and
:data:`SHAPES_FILE` records the differences; :func:`load_with_shapes` builds the model from
the config, gives those parameters their recorded shapes and loads the weights strictly.

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


def shape_overrides(model: nn.Module) -> dict[str, list[int]]:
    """``parameter name -> shape`` for every parameter whose shape differs from the config's model."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    with torch.device("meta"):
        try:
            reference = type(model)(config)
        except Exception:  # a model class that cannot be built from its config alone: nothing to compare with
            return {}
    want = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    return {name: list(p.shape) for name, p in model.named_parameters() if name in want and tuple(p.shape) != want[name]}


def write_shapes(folder: Path, model: nn.Module) -> bool:
    """Write :data:`SHAPES_FILE` into ``folder`` when ``model`` needs one; True if written."""
    shapes = shape_overrides(model)
    if not shapes:
        return False
    note = (
        "Parameters whose shapes differ from what config.json builds (per-layer widths after structured pruning). "
        "graphprune's load_model builds the model with these shapes; transformers' from_pretrained alone stops with a size mismatch."
    )
    (folder / SHAPES_FILE).write_text(json.dumps({"note": note, "shapes": shapes}, indent=1) + "\n")
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
        shapes = json.loads((path / SHAPES_FILE).read_text())["shapes"]
    except (OSError, ValueError, KeyError) as exc:
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


__all__ = ["SHAPES_FILE", "load_with_shapes", "shape_overrides", "write_shapes"]
