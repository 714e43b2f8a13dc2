"""CPU sparse kernels: ``CSRLinear`` (unstructured) and ``BSRLinear`` (block-sparse).

Both compute ``y = b + W @ xᵀ`` with one ``torch.addmm`` on the sparse weight and the
2-D view ``x [tokens, in]`` (MKL sparse BLAS on CPU), then transpose back. Torch's CPU
sparse matmul implements float32 and float64 only ("not implemented for 'Half' /
'BFloat16'"), so other dtypes are reported unavailable rather than failing at run time.

The compressed arrays (``crow_indices``, ``col_indices``, ``values``) are the buffers and
``forward`` wraps them into a sparse tensor on each call (no copy). Holding the sparse
tensor itself would break ``copy.deepcopy`` ("Cannot access storage of
SparseCsrTensorImpl") and TorchScript saving of BSR; plain buffers also make
``state_dict``, ``.to()`` and tracing work as for any module.

Whether sparse is faster than dense depends on the sparsity, the shape and the token
count (on typical CPUs CSR loses to dense at 50 % and wins well above 90 %): measure with
:func:`graphprune.kernels.select_kernel` instead of assuming.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from graphprune.kernels.base import CPU_SPARSE_DTYPES, KernelLinear, KernelUnavailableError, check_weight, flatten_input

#: BSR block edges tried, largest first (larger blocks: fewer indices, denser inner loops).
BSR_BLOCKSIZES = (32, 16, 8, 4)
#: default minimum fraction of all-zero blocks for BSR to be offered.
BSR_MIN_ZERO_BLOCKS = 0.5


def _quiet(fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    # torch warns that sparse CSR/BSR support "is in beta" on conversions, and the tracer that
    # a constructed sparse tensor "is registered as a constant" (it is not: the trace rebuilds
    # it from the buffers). Both are noise for callers.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta.*")
        warnings.filterwarnings("ignore", message=".*registered as constants in the trace.*")
        return fn(*args, **kwargs)


def _cpu_reason(weight: Tensor, device: torch.device, dtype: torch.dtype) -> str | None:
    if torch.device(device).type != "cpu":
        return f"CPU only (asked for {device})"
    if dtype not in CPU_SPARSE_DTYPES:
        return f"torch's CPU sparse matmul does not implement {dtype} (only float32/float64)"
    if weight.dim() != 2:
        return f"needs a 2-D weight, got shape {tuple(weight.shape)}"
    return None


def _sparse_linear(weight: Tensor, bias: Tensor | None, x: Tensor, out_features: int) -> Tensor:
    x2, lead = flatten_input(x)
    if bias is None:
        y = torch.mm(weight, x2.t())
    else:
        y = torch.addmm(bias.unsqueeze(1), weight, x2.t())
    return y.t().reshape(lead + (out_features,))


class _CompressedLinear(KernelLinear):
    """Shared storage and forward of CSR and BSR: compressed-row arrays as buffers."""

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    _constructor: Callable[..., Tensor]

    def _store(self, sparse: Tensor) -> None:
        self.register_buffer("crow_indices", sparse.crow_indices())
        self.register_buffer("col_indices", sparse.col_indices())
        self.register_buffer("values", sparse.values())

    @property
    def weight(self) -> Tensor:
        """The weight as a sparse tensor (a view of the buffers)."""
        return _quiet(
            type(self)._constructor,
            self.crow_indices,
            self.col_indices,
            self.values,
            (self.out_features, self.in_features),
            check_invariants=False,  # built from a valid tensor; checking costs O(nnz) per call
        )

    def forward(self, x: Tensor) -> Tensor:
        return _sparse_linear(self.weight, self.bias, x, self.out_features)

    def dense_weight(self) -> Tensor:
        return self.weight.to_dense()

    @property
    def nnz(self) -> int:
        """Stored values (for BSR: whole blocks, zeros inside them included)."""
        return int(self.values.numel())


class CSRLinear(_CompressedLinear):
    """Linear with a ``torch.sparse_csr`` weight (compressed rows: any zero pattern)."""

    kind = "csr"
    _constructor = torch.sparse_csr_tensor

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        check_weight(weight, bias)
        reason = _cpu_reason(weight, weight.device, weight.dtype)
        if reason:
            raise KernelUnavailableError(f"CSRLinear: {reason}; keep this layer dense (DenseLinear).")
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self._store(_quiet(Tensor.to_sparse_csr, weight.detach().contiguous()))

    @classmethod
    def unavailable_reason(cls, weight: Tensor, *, device: torch.device, dtype: torch.dtype) -> str | None:
        return _cpu_reason(weight, device, dtype)

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Tensor | None = None) -> CSRLinear:
        return cls(weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz}"


def zero_block_fraction(weight: Tensor, blocksize: int) -> float:
    """Fraction of the ``blocksize × blocksize`` tiles of ``weight`` that are entirely zero."""
    out, inp = weight.shape
    if out % blocksize or inp % blocksize:
        raise KernelUnavailableError(f"block size {blocksize} does not divide the weight shape [{out}, {inp}].")
    tiles = (weight != 0).reshape(out // blocksize, blocksize, inp // blocksize, blocksize)
    nonzero = tiles.any(dim=3).any(dim=1)
    return 1.0 - nonzero.float().mean().item()


def choose_blocksize(
    weight: Tensor, sizes: tuple[int, ...] = BSR_BLOCKSIZES, min_zero_blocks: float = BSR_MIN_ZERO_BLOCKS
) -> tuple[int, float] | None:
    """The largest block edge in ``sizes`` that divides both dimensions and whose fraction of
    all-zero blocks reaches ``min_zero_blocks``; returns ``(blocksize, zero_fraction)`` or None.

    Smaller blocks always have at least as many zero tiles (a zero 16-tile is four zero
    8-tiles), but pay more index overhead, so the largest qualifying edge is taken.
    """
    for size in sorted(sizes, reverse=True):
        if weight.shape[0] % size or weight.shape[1] % size:
            continue
        frac = zero_block_fraction(weight, size)
        if frac >= min_zero_blocks:
            return size, frac
    return None


class BSRLinear(_CompressedLinear):
    """Linear with a ``torch.sparse_bsr`` weight: only whole zero blocks are skipped.

    Args:
        weight: dense ``[out, in]`` weight.
        bias: optional ``[out]``.
        blocksize: block edge; None chooses with :func:`choose_blocksize`.
        min_zero_blocks: minimum fraction of all-zero blocks (0 accepts any weight, useful
            in tests; below ~0.5 BSR is practically never faster than dense).
    """

    kind = "bsr"
    _constructor = torch.sparse_bsr_tensor

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        blocksize: int | None = None,
        min_zero_blocks: float = BSR_MIN_ZERO_BLOCKS,
    ) -> None:
        check_weight(weight, bias)
        reason = self.unavailable_reason(
            weight, device=weight.device, dtype=weight.dtype, blocksize=blocksize, min_zero_blocks=min_zero_blocks
        )
        if reason:
            raise KernelUnavailableError(f"BSRLinear: {reason}; keep this layer dense or use CSRLinear.")
        if blocksize is None:
            choice = choose_blocksize(weight, min_zero_blocks=min_zero_blocks)
            assert choice is not None  # unavailable_reason checked it
            blocksize = choice[0]
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.blocksize = int(blocksize)
        self._store(_quiet(Tensor.to_sparse_bsr, weight.detach().contiguous(), (self.blocksize, self.blocksize)))

    @classmethod
    def unavailable_reason(
        cls,
        weight: Tensor,
        *,
        device: torch.device,
        dtype: torch.dtype,
        blocksize: int | None = None,
        min_zero_blocks: float = BSR_MIN_ZERO_BLOCKS,
    ) -> str | None:
        reason = _cpu_reason(weight, device, dtype)
        if reason:
            return reason
        if blocksize is None:
            if choose_blocksize(weight, min_zero_blocks=min_zero_blocks) is None:
                usable = [s for s in BSR_BLOCKSIZES if weight.shape[0] % s == 0 and weight.shape[1] % s == 0]
                if not usable:
                    return f"no block size in {BSR_BLOCKSIZES} divides the shape {list(weight.shape)}"
                best = max(zero_block_fraction(weight, s) for s in usable)
                return (
                    f"too few all-zero blocks: at best {best:.0%} for block sizes {usable}, need {min_zero_blocks:.0%}"
                )
            return None
        if weight.shape[0] % blocksize or weight.shape[1] % blocksize:
            return f"block size {blocksize} does not divide the shape {list(weight.shape)}"
        frac = zero_block_fraction(weight, blocksize)
        if frac < min_zero_blocks:
            return f"only {frac:.0%} of {blocksize}x{blocksize} blocks are zero, need {min_zero_blocks:.0%}"
        return None

    @classmethod
    def from_linear(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        blocksize: int | None = None,
        min_zero_blocks: float = BSR_MIN_ZERO_BLOCKS,
    ) -> BSRLinear:
        return cls(weight, bias, blocksize=blocksize, min_zero_blocks=min_zero_blocks)

    def extra_repr(self) -> str:
        nblocks = int(self.values.shape[0])
        return f"{super().extra_repr()}, blocksize={self.blocksize}, stored_blocks={nblocks}"
