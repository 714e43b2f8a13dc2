"""Make every linear projection of a model an ``nn.Linear`` before capture.

The passes find prunable weights as ``aten.linear`` nodes on a weight attribute. Two
common layer types compute the same product another way and would hide their weights:

* **GPT-2's ``Conv1D``** stores its weight transposed (``[in, out]``) and computes
  ``addmm(b, x, W)``. It becomes a :class:`TransposedLinear`: an ``nn.Linear`` holding
  ``Wᵀ`` whose state dict, saved or loaded, keeps the ``[in, out]`` layout -- so a saved
  folder is still a GPT-2 folder that transformers loads.
* **``nn.Linear`` subclasses with their own forward** (Falcon's ``FalconLinear`` computes
  ``x @ W.T``) become plain ``nn.Linear``: same parameters, same state dict.

Each replacement is checked numerically on a random input first; a layer whose forward
computes something else is left alone (and its weights stay out of pruning, as before), and
so is a layer without storage yet (``--lazy`` loading captures a meta-device model).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class TransposedLinear(nn.Linear):
    """An ``nn.Linear`` whose state dict stores the weight transposed (``[in, out]``, GPT-2's Conv1D layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._register_state_dict_hook(_transpose_on_save)
        self._register_load_state_dict_pre_hook(_transpose_on_load)


def _transpose_on_save(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    if key in state:
        state[key] = state[key].t()


def _transpose_on_load(state: dict[str, Any], prefix: str, *args: Any) -> None:
    key = prefix + "weight"
    if key in state and isinstance(state[key], Tensor) and state[key].dim() == 2:
        state[key] = state[key].t()


def _agrees(module: nn.Module, reference: Any, in_features: int) -> bool:
    weight = next(module.parameters())
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(weight)
    with torch.no_grad():
        got, want = module(x), reference(x)
    return bool(got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6))


def _conv1d_as_linear(module: nn.Module) -> TransposedLinear | None:
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    fan_in, fan_out = weight.shape
    if not _agrees(module, lambda x: x @ weight + (bias if bias is not None else 0), fan_in):
        return None
    linear = TransposedLinear(fan_in, fan_out, bias=bias is not None).to(weight)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(weight.requires_grad)
    return linear


def standard_linears(model: nn.Module) -> list[str]:
    """Replace Conv1D layers and custom-forward ``nn.Linear`` subclasses in ``model`` (in place).

    Returns:
        The module paths that were replaced.
    """
    changed: list[str] = []
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if not name or not isinstance(weight, Tensor) or weight.is_meta:
            continue  # nothing to check a storage-less (lazy) layer against: left as it is
        cls = type(module)
        if isinstance(module, nn.Linear) and cls.forward is not nn.Linear.forward and not isinstance(module, TransposedLinear):
            if _agrees(module, lambda x, m=module: nn.functional.linear(x, m.weight, m.bias), module.in_features):
                module.__class__ = nn.Linear  # same parameters and state dict, the standard forward
                changed.append(name)
        elif cls.__name__ == "Conv1D":
            linear = _conv1d_as_linear(module)
            if linear is not None:
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)
                changed.append(name)
    if changed:
        log.info("%d projection layers made nn.Linear for capture (%s ...)", len(changed), changed[0])
    return changed
