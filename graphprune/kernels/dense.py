"""``DenseLinear``: the plain dense kernel, the baseline every sparse kernel must beat."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from graphprune.kernels.base import KernelLinear, check_weight


class DenseLinear(KernelLinear):
    """``F.linear`` with a dense weight buffer (zeros, if any, are stored and multiplied)."""

    kind = "dense"
    weight: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        check_weight(weight, bias)
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight.detach().clone().contiguous())

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Tensor | None = None) -> DenseLinear:
        return cls(weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> Tensor:
        return self.weight
