"""``PackedLinear``: a native CPU sparse Linear for decoding (1 to 8 tokens per call).

Storage ("bitmask + packed values", see ``csrc/packed_linear.cpp``): per output row a
bitmask of its nonzero inputs (``int32`` words, ``ceil(in / 32)`` per row), the row's
nonzeros packed contiguously (``float32``) and an ``int64`` offset per row into them.
The mask costs one bit per weight, so a 50 % sparse weight is read in ~53 % of its dense
bytes, where CSR's 32/64-bit column index per nonzero reads as much as dense or more. At
decode the Linear is bound by the bytes of its weight, so bytes are time.

The kernel is the custom operator ``graphprune::packed_linear``, built from source with
``torch.utils.cpp_extension.load`` on first use (``-O3 -march=native``: AVX-512 expand
loads where the CPU has them, AVX2 table-driven permutes where it has AVX2, a scalar
loop otherwise; :func:`native_isa` says which) into
``~/.cache/graphprune/ext/<torch version>-<cpu>`` and loaded once per process. When the
build or load fails (no compiler, no headers, ...) one warning names the cause,
:func:`packed_available` is False, :func:`packed_unavailable_reason` says why and
:meth:`PackedLinear.unavailable_reason` reports it, so the layers stay dense. Setting
``GRAPHPRUNE_NO_NATIVE=1`` takes that path without trying (for tests and for machines
where a compile is unwanted).

The operator has a fake (shape-only) implementation, so ``torch.export`` and
``torch.compile`` trace through it; ``torch.jit.trace`` records it like any op, and a
saved TorchScript file needs the library loaded (:func:`load_native`) before
``torch.jit.load``. Only float32 is implemented.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import threading
from pathlib import Path

import torch
from torch import Tensor

from graphprune.fileio import cache_root
from graphprune.kernels.base import KernelLinear, KernelUnavailableError, check_weight

log = logging.getLogger(__name__)

#: environment variable that disables the native build (value ``1``, ``true`` or ``yes``).
NO_NATIVE_ENV = "GRAPHPRUNE_NO_NATIVE"
EXTENSION_NAME = "graphprune_packed"
SOURCE = Path(__file__).resolve().parent / "csrc" / "packed_linear.cpp"
#: the other sources built into the same operator library (``graphprune::prox24``, the
#: common cases of the exact 2:4 proximal operator, see ``graphprune.solvers.proximal``).
EXTRA_SOURCES = (Path(__file__).resolve().parent / "csrc" / "prox24.cpp",)
#: the only dtype the kernel implements.
PACKED_DTYPE = torch.float32
WORD_BITS = 32

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool, "reason": str | None after the first attempt


def _cpu_tag() -> str:
    """A short tag of the CPU's instruction sets: ``-march=native`` builds are not portable,
    so a cache directory shared between machines must not mix them."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


def build_directory() -> Path:
    """Where the extension is built: ``$XDG_CACHE_HOME`` (or ``~/.cache``)/graphprune/ext/<torch>-<cpu>."""
    version = torch.__version__.replace("+", "_")
    return cache_root() / "ext" / f"{version}-{_cpu_tag()}"


def _disabled() -> bool:
    return os.environ.get(NO_NATIVE_ENV, "").strip().lower() in {"1", "true", "yes"}


def _build() -> None:
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    # -fopenmp: at::parallel_for splits the rows only when compiled with OpenMP, the
    # backend of torch's CPU builds (the extension then shares torch's libgomp)
    cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(SOURCE), *(str(extra) for extra in EXTRA_SOURCES)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


def _summary(message: str, limit: int = 400) -> str:
    """The telling lines of a build error: its first line and the compiler's complaints,
    not the (long) compile commands ninja echoes."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "no message"
    keys = ("error", "not found", "fatal", "no such", "cannot", "undefined")
    telling = [line for line in lines[1:] if any(k in line.lower() for k in keys) and " -c " not in line and not line.startswith(("FAILED", "["))]
    head = re.split(r":?\s*\[\d+/\d+\]", lines[0])[0]  # ninja's "[1/2] <command>" follows the headline
    text = "; ".join([head, *telling[:3]])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_native() -> bool:
    """Build (if needed) and load the operator library once per process; True when usable.

    The first failure is logged once as a warning; later calls return False at once.
    """
    with _lock:
        if "loaded" in _state:
            return bool(_state["loaded"])
        reason: str | None = None
        if _disabled():
            reason = f"{NO_NATIVE_ENV} is set"
        elif _op_loaded():  # the library was loaded by other means (torch.ops.load_library)
            _register_fake()
        elif not all(src.is_file() for src in (SOURCE, *EXTRA_SOURCES)):
            missing = [str(src) for src in (SOURCE, *EXTRA_SOURCES) if not src.is_file()]
            reason = f"the kernel source {', '.join(missing)} is missing"
        else:
            try:
                _build()
                _register_fake()
            except Exception as exc:  # any build/load failure means "run dense", never a crash
                log.debug("graphprune: building %s failed", SOURCE, exc_info=True)
                reason = f"building the native kernel failed ({type(exc).__name__}: {_summary(str(exc))})"
        _state["loaded"] = reason is None
        _state["reason"] = reason
        if reason is not None:
            log.warning(
                "graphprune: native kernels unavailable: %s; graphprune runs packed sparse layers dense and the "
                "2:4 proximal operator in Python (same results, slower).", reason,
            )
        return reason is None


def packed_available() -> bool:
    """Whether ``graphprune::packed_linear`` is loaded (builds it on the first call)."""
    return load_native()


def packed_unavailable_reason() -> str | None:
    """Why the native kernel cannot be used in this process, or None when it can."""
    load_native()
    reason = _state.get("reason")
    return None if reason is None else str(reason)


def has_avx512() -> bool:
    """Whether the loaded kernel was compiled with its AVX-512 path (False when not loaded)."""
    return load_native() and bool(torch.ops.graphprune.packed_has_avx512())


def native_isa() -> str | None:
    """The vector path of the loaded kernel (``"avx512"``, ``"avx2"`` or ``"scalar"``), None when not loaded."""
    return str(torch.ops.graphprune.packed_isa()) if load_native() else None


def _register_fake() -> None:
    """Shape-only implementation for ``torch.export`` / ``torch.compile`` (once per process)."""
    if _state.get("fake"):
        return

    @torch.library.register_fake("graphprune::packed_linear")
    def _packed_linear_fake(x: Tensor, mask: Tensor, offsets: Tensor, values: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
        torch._check(x.shape[-1] <= mask.shape[1] * WORD_BITS)
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("graphprune::dense_linear")
    def _dense_linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        torch._check(x.shape[-1] == weight.shape[1])
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    _state["fake"] = True


# ---------------------------------------------------------------------------- packing
def pack_weight(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``weight [out, in]`` as ``(mask int32 [out, ceil(in/32)], offsets int64 [out+1], values)``.

    Bit ``b`` of word ``w`` of row ``r`` is set when ``weight[r, 32*w + b] != 0``; the
    values are the nonzeros in row-major order (``weight[weight != 0]``).
    """
    out, inp = weight.shape
    words = (inp + WORD_BITS - 1) // WORD_BITS
    nonzero = weight != 0
    padded = torch.zeros(out, words * WORD_BITS, dtype=torch.int64, device=weight.device)
    padded[:, :inp] = nonzero.to(torch.int64)
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=weight.device)
    unsigned = (padded.reshape(out, words, WORD_BITS) << shifts).sum(dim=-1)  # 0 .. 2**32 - 1
    mask = torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)  # same bits, signed
    offsets = torch.zeros(out + 1, dtype=torch.int64, device=weight.device)
    offsets[1:] = nonzero.sum(dim=1).cumsum(dim=0)
    values = weight[nonzero].contiguous()
    return mask.contiguous(), offsets, values


def unpack_weight(mask: Tensor, values: Tensor, in_features: int) -> Tensor:
    """The dense ``[out, in]`` weight of :func:`pack_weight`'s ``mask`` and ``values``."""
    out, words = mask.shape
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=mask.device)
    bits = (mask.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    nonzero = bits.reshape(out, words * WORD_BITS)[:, :in_features].bool()
    dense = torch.zeros(out, in_features, dtype=values.dtype, device=values.device)
    dense[nonzero] = values
    return dense


def _reason(weight: Tensor, device: torch.device, dtype: torch.dtype) -> str | None:
    if torch.device(device).type != "cpu":
        return f"CPU only (asked for {device})"
    if dtype != PACKED_DTYPE:
        return f"the packed kernel implements float32 only, got {dtype}"
    if weight.dim() != 2:
        return f"needs a 2-D weight, got shape {tuple(weight.shape)}"
    return packed_unavailable_reason()


class NativeLinear(KernelLinear):
    """What the native library's kernels share: float32 on the CPU with the library loaded,
    checked when a kernel is built (:class:`KernelUnavailableError` naming the reason)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        check_weight(weight, bias)
        name = type(self).__name__
        reason = _reason(weight, weight.device, weight.dtype)
        if reason:
            raise KernelUnavailableError(f"{name}: {reason}; keep this layer dense (DenseLinear).")
        if bias is not None and bias.dtype != PACKED_DTYPE:
            raise KernelUnavailableError(f"{name}: the bias must be float32 like the weight, got {bias.dtype}.")
        super().__init__(weight.shape[1], weight.shape[0], bias)

    @classmethod
    def unavailable_reason(cls, weight: Tensor, *, device: torch.device, dtype: torch.dtype) -> str | None:
        return _reason(weight, device, dtype)

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Tensor | None = None) -> NativeLinear:
        return cls(weight, bias)


class PackedLinear(NativeLinear):
    """Linear with a bitmask + packed-values weight, computed by ``graphprune::packed_linear``.

    Best at decode (1-8 tokens), where time follows the bytes read; for long prompts a
    dense GEMM is faster (measure with :func:`graphprune.kernels.select_kernel`).
    """

    kind = "packed"
    mask: Tensor
    offsets: Tensor
    values: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__(weight, bias)
        mask, offsets, values = pack_weight(weight.detach())
        self.register_buffer("mask", mask)
        self.register_buffer("offsets", offsets)
        self.register_buffer("values", values)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_tracing():  # the operator checks the shape itself; keep traces free of constants
            self._check_input(x)
        return torch.ops.graphprune.packed_linear(x, self.mask, self.offsets, self.values, self.bias, self.out_features)

    def dense_weight(self) -> Tensor:
        return unpack_weight(self.mask, self.values, self.in_features)

    @property
    def nnz(self) -> int:
        """Stored (nonzero) weights."""
        return int(self.values.numel())

    def bytes_read(self) -> int:
        """Bytes of storage one call reads: mask, offsets, values and bias."""
        tensors = [self.mask, self.offsets, self.values] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz}"


class StreamLinear(NativeLinear):
    """A dense weight streamed row by row by ``graphprune::dense_linear`` (FMA, rows split
    between threads): for 1-8 tokens, where torch's float32 matmul reads the weight at a
    fraction of the memory bandwidth on some CPUs. The weight is shared with the tensor it
    is built from (no copy), so it can serve a weight tied to the embedding."""

    kind = "stream"
    weight: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__(weight, bias)
        self.register_buffer("weight", weight.detach().contiguous())

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_tracing():
            self._check_input(x)
        return torch.ops.graphprune.dense_linear(x, self.weight, self.bias)

    def dense_weight(self) -> Tensor:
        return self.weight


def _op_loaded() -> bool:
    try:
        return hasattr(torch.ops.graphprune, "packed_linear")
    except RuntimeError:
        return False


# The C++ library names this module as the home of its fake implementation, so torch
# imports it when a library loaded by other means (e.g. before ``torch.jit.load``) is
# traced: register the fake then, without building anything.
if _op_loaded():
    with _lock:
        _register_fake()
