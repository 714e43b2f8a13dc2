"""``SemiStructuredLinear``: 2:4 sparse weights on NVIDIA sparse tensor cores (CUDA only).

Uses ``torch.sparse.to_sparse_semi_structured`` (CUTLASS or cuSPARSELt backend, chosen by
torch), which needs: a CUDA device, float16 or bfloat16, a contiguous 2-D weight whose
every group of 4 consecutive input weights has at most 2 nonzeros, and both dimensions
multiples of the backend's minimum tile (32 rows x 64 columns for the CUTLASS half
types). Each of these is checked up front so the error names the cause instead of
surfacing deep inside torch.

Unlike the other kernels the compressed weight is held as a frozen ``nn.Parameter``,
the form torch documents for semi-structured tensors; it cannot be traced or saved by
TorchScript, so exporters lower this kernel to a dense ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphprune.kernels.base import KernelLinear, KernelUnavailableError, check_weight, flatten_input

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
#: minimum / multiple of (rows, cols) torch's CUTLASS backend accepts for half types.
MIN_TILE = (32, 64)


def is_n_m_sparse(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive inputs in each row has at most ``n`` nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % m:
        return False
    groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
    return bool((groups <= n).all())


class SemiStructuredLinear(KernelLinear):
    """Linear with a 2:4 semi-structured sparse weight (CUDA, float16/bfloat16)."""

    kind = "semi_structured"
    traceable = False

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        check_weight(weight, bias)
        reason = self.unavailable_reason(weight, device=weight.device, dtype=weight.dtype)
        if reason:
            raise KernelUnavailableError(f"SemiStructuredLinear: {reason}.")
        super().__init__(weight.shape[1], weight.shape[0], bias)
        from torch.sparse import to_sparse_semi_structured

        try:
            packed = to_sparse_semi_structured(weight.detach().contiguous())
        except RuntimeError as exc:  # backend-specific limits we did not anticipate
            raise KernelUnavailableError(f"SemiStructuredLinear: torch refused the weight: {exc}") from exc
        self.weight = nn.Parameter(packed, requires_grad=False)

    @classmethod
    def unavailable_reason(cls, weight: Tensor, *, device: torch.device, dtype: torch.dtype) -> str | None:
        # Structural checks first: they hold on any machine, so a CPU run already says
        # whether the weight would be accepted on a GPU.
        if weight.dim() != 2:
            return f"needs a 2-D weight, got shape {tuple(weight.shape)}"
        if not is_n_m_sparse(weight, 2, 4):
            return (
                "weight is not 2:4 sparse (some group of 4 consecutive inputs has more than 2 nonzeros); "
                "prune with pattern '2:4' first"
            )
        rows, cols = weight.shape
        if rows % MIN_TILE[0] or cols % MIN_TILE[1]:
            return f"weight shape [{rows}, {cols}] is not a multiple of [{MIN_TILE[0]}, {MIN_TILE[1]}]"
        if dtype not in SEMI_STRUCTURED_DTYPES:
            return f"needs float16 or bfloat16, got {dtype}; cast the model first"
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return (
                f"needs a CUDA device with sparse tensor cores (asked for {device}, "
                f"CUDA available: {torch.cuda.is_available()})"
            )
        return None

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Tensor | None = None) -> SemiStructuredLinear:
        return cls(weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        x2, lead = flatten_input(x)
        return F.linear(x2.contiguous(), self.weight, self.bias).reshape(lead + (self.out_features,))

    def dense_weight(self) -> Tensor:
        return self.weight.to_dense()
