"""The common contract of graphprune's Linear kernels, and their lowering to ``nn.Linear``.

A kernel is an inference-only module that computes exactly ``F.linear(x, W, b)`` for
``x [..., in]`` with some storage of ``W [out, in]`` (dense, CSR, BSR, 2:4
semi-structured). Its tensors are buffers, not parameters: kernels are produced
after pruning and are never trained, so optimizers must not see them.

Exporters cannot serialise every storage (ONNX has no sparse matmul), so every
kernel can give back an equivalent dense ``nn.Linear`` (:meth:`KernelLinear.to_linear`);
:func:`lower_kernels` does that for a whole model and :func:`kernels_lowered` does it
temporarily, restoring the kernels afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn

from graphprune.errors import ConfigError

#: float dtypes torch's CPU sparse (MKL) matmul implements; half types raise "not implemented".
CPU_SPARSE_DTYPES = (torch.float32, torch.float64)


class KernelUnavailableError(ConfigError):
    """A kernel cannot represent this weight on this device / dtype (the message says why)."""


class KernelLinear(nn.Module):
    """Base class: ``forward(x) == F.linear(x, W, b)`` for any leading dimensions of ``x``.

    Subclasses set ``kind`` (the registry name), implement :meth:`unavailable_reason`,
    :meth:`from_linear`, :meth:`forward` and :meth:`dense_weight`.

    Attributes:
        kind: short name (``"dense"``, ``"csr"``, ...), used in reports.
        traceable: whether ``torch.jit.trace`` can record the forward and save the
            storage; exporters lower kernels where this is False.
    """

    kind: ClassVar[str] = "base"
    traceable: ClassVar[bool] = True
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ConfigError(
                f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},) for a "
                f"[{self.out_features}, {self.in_features}] weight."
            )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    # ---------------------------------------------------------------- construction
    @classmethod
    def unavailable_reason(cls, weight: Tensor, *, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this kernel cannot run ``weight`` on ``device``/``dtype``, or None when it can."""
        return None

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Tensor | None = None) -> KernelLinear:
        """Build the kernel from a dense ``weight [out, in]`` and optional ``bias [out]``.

        Raises:
            KernelUnavailableError: the weight, device or dtype does not suit this kernel.
        """
        raise NotImplementedError

    @classmethod
    def from_module(cls, linear: nn.Linear) -> KernelLinear:
        """Build the kernel from an ``nn.Linear`` (its tensors are copied, not shared)."""
        return cls.from_linear(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())

    # ---------------------------------------------------------------- behaviour
    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The weight as a dense ``[out, in]`` tensor (a new tensor or the stored one)."""
        raise NotImplementedError

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function with a dense weight (for exporters)."""
        weight = self.dense_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"{type(self).__name__} expects inputs [..., {self.in_features}], got {tuple(x.shape)}.")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def check_weight(weight: Tensor, bias: Tensor | None) -> None:
    """Reject anything that is not a dense 2-D weight with a matching 1-D bias."""
    if weight.dim() != 2 or weight.layout != torch.strided:
        raise ConfigError(
            f"a kernel needs a dense 2-D weight [out, in], got layout {weight.layout} and shape {tuple(weight.shape)}."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ConfigError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},).")


def lower_kernels(model: nn.Module) -> nn.Module:
    """Replace every :class:`KernelLinear` in ``model`` by an equivalent ``nn.Linear``, in place.

    Returns:
        ``model`` (or, when ``model`` itself is a kernel, its ``nn.Linear``).
    """
    if isinstance(model, KernelLinear):
        return model.to_linear()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, KernelLinear):
                setattr(parent, child_name, child.to_linear())
    return model


@contextmanager
def kernels_lowered(model: nn.Module, *, only_untraceable: bool = False) -> Iterator[nn.Module]:
    """Temporarily lower kernels to ``nn.Linear`` (e.g. for an export); restore them on exit.

    Nothing but the kernels is copied, so this costs one dense weight per kernel, not a
    copy of the model.

    Args:
        model: the model to lower (mutated during the block, restored afterwards).
        only_untraceable: lower only kernels whose ``traceable`` is False.
    """
    if isinstance(model, KernelLinear):
        yield model.to_linear() if (not only_untraceable or not model.traceable) else model
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, KernelLinear) and (not only_untraceable or not child.traceable):
                    setattr(parent, child_name, child.to_linear())
                    swapped.append((parent, child_name, child))
        yield model
    finally:
        for parent, child_name, child in reversed(swapped):
            setattr(parent, child_name, child)


def has_kernels(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is a :class:`KernelLinear`."""
    return any(isinstance(m, KernelLinear) for m in model.modules())


def flatten_input(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x [..., in]`` as a 2-D ``[tokens, in]`` tensor plus the leading shape to restore."""
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]), lead
