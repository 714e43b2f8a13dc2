"""Sparse Linear kernels (torch only) and the measured choice between them.

* :class:`DenseLinear` -- plain ``F.linear``, the reference and fallback.
* :class:`CSRLinear` -- unstructured sparsity, ``torch.sparse_csr`` on CPU.
* :class:`BSRLinear` -- block sparsity, ``torch.sparse_bsr`` on CPU.
* :class:`SemiStructuredLinear` -- 2:4 sparsity on CUDA sparse tensor cores.
* :class:`PackedLinear` -- graphprune's own CPU kernel for decoding (bitmask + packed
  values, AVX-512 expand loads), a torch custom operator built from source at first use.
* :class:`StreamLinear` -- the same library's dense kernel for decoding (a dense weight
  streamed row by row), for unpruned weights such as the LM head.

:func:`select_kernel` measures the applicable ones on the real shape and keeps dense
unless a sparse kernel is faster; :func:`lower_kernels` turns kernels back into
``nn.Linear`` for exporters.
"""

from graphprune.kernels.base import KernelLinear, KernelUnavailableError, has_kernels, kernels_lowered, lower_kernels
from graphprune.kernels.dense import DenseLinear
from graphprune.kernels.packed import PackedLinear, StreamLinear, packed_available, packed_unavailable_reason
from graphprune.kernels.select import KERNELS, KernelReport, median_runtime, select_kernel
from graphprune.kernels.semi_structured import SemiStructuredLinear, is_n_m_sparse
from graphprune.kernels.sparse_cpu import BSRLinear, CSRLinear, choose_blocksize, zero_block_fraction

__all__ = [
    "BSRLinear",
    "CSRLinear",
    "DenseLinear",
    "KERNELS",
    "KernelLinear",
    "KernelReport",
    "KernelUnavailableError",
    "PackedLinear",
    "SemiStructuredLinear",
    "StreamLinear",
    "choose_blocksize",
    "has_kernels",
    "is_n_m_sparse",
    "kernels_lowered",
    "lower_kernels",
    "median_runtime",
    "packed_available",
    "packed_unavailable_reason",
    "select_kernel",
    "zero_block_fraction",
]
