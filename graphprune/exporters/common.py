"""What the ONNX and TorchScript exporters share: the logits wrapper, probe inputs and
the report (atomic file placement is :mod:`graphprune.fileio`'s)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from graphprune.errors import ExportError
from graphprune.graph.capture import LogitsOnly

DEFAULT_EXAMPLE_SHAPE = (2, 16)


def ort_session(path: str | Path, *, threads: int | None = None, spinning: bool = True) -> Any:
    """An onnxruntime ``InferenceSession`` on the CPU provider, warnings off.

    ``spinning=False`` stops the intra-op threads from spin-waiting after a run: sessions
    timed in turn (interleaved benchmarks) must not take cores from the next one's run.
    ``threads`` fixes the intra-op thread count (one inter-op thread). Load errors are
    onnxruntime's own; callers name them.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore every submodule's flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def vocab_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "vocab_size", None)
    return int(size) if size else None


def require_cpu(model: nn.Module) -> None:
    """Exporters trace and check on CPU (onnxruntime's CPU provider, a CPU subprocess)."""
    devices = {t.device.type for t in model.parameters()} | {t.device.type for t in model.buffers()}
    if devices - {"cpu"}:
        raise ExportError(
            f"{type(model).__name__} has tensors on {sorted(devices)}; exporters run on CPU: call model.cpu() "
            "first (GPU-only kernels such as SemiStructuredLinear need lower_kernels(model) before that)."
        )


def example_inputs(model: nn.Module, example_tokens: Tensor | None) -> Tensor:
    """The tokens to export with: ``example_tokens`` checked, or a seeded ``[2, 16]`` batch.

    Batch and sequence must both be >= 2: torch.export specialises a dimension whose
    example size is 1, and the export would lose that dynamic axis.
    """
    if example_tokens is None:
        vocab = vocab_size(model)
        if vocab is None:
            raise ExportError(
                f"cannot make example tokens for {type(model).__name__} (no config.vocab_size); pass example_tokens."
            )
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, DEFAULT_EXAMPLE_SHAPE, generator=gen)
    if example_tokens.dim() != 2 or example_tokens.dtype not in (torch.int64, torch.int32):
        raise ExportError(
            f"example_tokens must be integer token ids [batch, seq], got {example_tokens.dtype} "
            f"{tuple(example_tokens.shape)}."
        )
    if min(example_tokens.shape) < 2:
        raise ExportError(
            f"example_tokens has shape {tuple(example_tokens.shape)}; use batch >= 2 and seq >= 2 so both "
            "axes stay dynamic (torch.export specialises size-1 dimensions)."
        )
    return example_tokens.to(torch.int64)


def probe_inputs(example: Tensor, model: nn.Module) -> list[Tensor]:
    """The export example plus a batch of another batch size and length (checks dynamic axes)."""
    vocab = vocab_size(model) or int(example.max().item()) + 1
    gen = torch.Generator().manual_seed(1)
    other = torch.randint(0, vocab, (example.shape[0] + 1, example.shape[1] + 5), generator=gen)
    return [example, other]


@torch.no_grad()
def reference_logits(model: nn.Module, inputs: list[Tensor]) -> list[Tensor]:
    wrapper = LogitsOnly(model)
    return [wrapper(ids).float() for ids in inputs]


@dataclass
class ExportReport:
    """What an export wrote and how well it matches PyTorch.

    Attributes:
        path: the model file.
        format: ``"onnx"`` or ``"torchscript"``.
        bytes: size on disk of everything written (model file plus external data).
        max_abs_diff: largest |logits difference| over the probe batches (None if unchecked).
        seconds: wall time of the whole export, checks included.
        sparse_initializers: initializers stored as ONNX ``SparseTensorProto`` (COO).
        packed_initializers: initializers stored as bitmask + nonzero values (decoded by ops).
        dense_bytes: serialized size without sparse storage (only when sparse storage was asked).
        external_data: the external data file, if the model needed one (> 2 GB).
        probe_shapes: the ``[batch, seq]`` shapes that were checked.
        quantize: ``"int8"`` for a quantized ONNX file, else ``None``; then also
            ``quantized_matmuls``, ``float32_bytes`` (the float file's size),
            ``float_max_abs_diff`` (float file vs PyTorch), ``relative_error`` and
            ``top1_agreement`` (int8 file vs float file on the probes); ``max_abs_diff`` is
            the int8 file's against PyTorch.
    """

    path: Path
    format: str
    bytes: int
    max_abs_diff: float | None
    seconds: float
    sparse_initializers: int = 0
    packed_initializers: int = 0
    dense_bytes: int | None = None
    external_data: Path | None = None
    probe_shapes: list[tuple[int, int]] = field(default_factory=list)
    quantize: str | None = None
    quantized_matmuls: int = 0
    float32_bytes: int | None = None
    float_max_abs_diff: float | None = None
    relative_error: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["external_data"] = None if self.external_data is None else str(self.external_data)
        return data


def check_diff(diff: float, atol: float, what: str, shapes: list[tuple[int, int]]) -> None:
    if not diff <= atol:  # NaN fails too
        raise ExportError(
            f"{what} logits differ from PyTorch by {diff:.3g} (> atol {atol:g}) on input shapes {shapes}; "
            "the file was not written. Check for ops the runtime handles differently, or raise atol "
            "if the model runs in reduced precision."
        )
