"""Generation-ready exports: a causal LM with its KV cache as one ONNX or TorchScript file.

Both formats share one interface (the one onnxruntime-genai and most serving loops use):

========================================  =====================================================
inputs                                    shape (``past`` = cached tokens, 0 on the first call)
========================================  =====================================================
``input_ids`` int64                       ``[batch, seq]``
``attention_mask`` int64                  ``[batch, past + seq]`` (0 marks left padding)
``position_ids`` int64                    ``[batch, seq]``
``past_key_values.{i}.key`` / ``.value``  ``[batch, kv_heads_i, past, head_dim_i]`` float32
========================================  =====================================================

outputs: ``logits [batch, 1, vocab]`` (the last position only: the LM head runs on one
position instead of ``seq``, which on a 49k-word vocabulary is a fifth of a prefill's work)
and ``present.{i}.key`` / ``.value`` ``[batch, kv_heads_i, past + seq, head_dim_i]``.

ONNX files are written in opset 23 (``RMSNormalization``, ``RotaryEmbedding`` and a
grouped-query ``Attention`` op where the model's code allows; onnxruntime >= 1.23), and the
projections that read one activation (q/k/v, gate/up) are packed into one ``MatMul`` each
(:mod:`graphprune.exporters.onnx_rewrite`): on the default model that is 121 instead of
211 matrix products per decode step.

Batch, sequence and past length are dynamic. The cache layout is read from the model by a
probe forward, layer by layer, so models whose layers differ in width export unchanged.

:func:`export_generation` writes a *folder*: the model file (``model.onnx``, plus
``model.onnx.data`` past 1.8 GB, or ``model.pt``), the tokenizer, and ``generation.json``
(format, file, cache layout, end-of-text ids). Before the folder is renamed into place, the
file decodes greedily from two prompts of different lengths (left-padded into one batch)
for ``check_tokens`` tokens and must produce eager PyTorch's tokens with logits within
``atol`` (a divergence is accepted only at an exact tie, where eager's two best logits are
closer than the measured difference; the report says so).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from graphprune.errors import ConfigError, ExportError
from graphprune.exporters.common import eval_mode, require_cpu
from graphprune.exporters.kv import DESCRIPTION, GENERATION_FORMATS, CacheLayout, KVCacheLM, read_description
from graphprune.exporters.onnx import SINGLE_FILE_LIMIT
from graphprune.exporters.onnx_rewrite import EXPORT_OPSET, fuse_cached_attention, pack_shared_input_matmuls
from graphprune.exporters.quantize import INT8_RTOL, check_quantize, check_relative, quantize_int8, relative_error
from graphprune.exporters.runners import EagerRunner, OnnxRunner, check_prompts, compare_greedy, generate, load_runner
from graphprune.fileio import atomic_dir, write_json
from graphprune.kernels import kernels_lowered

log = logging.getLogger(__name__)

GenerationFormat = Literal["onnx", "torchscript"]
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}


def check_generation_model(model: nn.Module) -> None:
    if not (hasattr(model, "config") and hasattr(model, "generate")):
        raise ExportError(
            f"{type(model).__name__} is not a Hugging Face causal LM; generation exports need one "
            "(load it with graphprune.models.load_model or transformers' AutoModelForCausalLM)."
        )


def example_step(layout: CacheLayout, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[Tensor, ...]:
    """Inputs of one call with a non-empty cache (every dynamic size >= 2, so none is specialised)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, layout.vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [torch.randn(t.shape, generator=gen) for t in layout.empty_past(batch, past)]
    return (ids, mask, pos, *cache)


def _export_onnx_file(module: KVCacheLM, stage: Path) -> list[Path]:
    import onnx

    from graphprune.exporters.onnx import raw_bytes
    from graphprune.exporters.onnx_ops import translation_table

    layout = module.layout
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * layout.layers)),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                example_step(layout),
                dynamo=True,
                input_names=layout.input_names(),
                output_names=layout.output_names(),
                dynamic_shapes=dynamic,
                custom_translation_table=translation_table(),
                optimize=True,
                verbose=False,
                opset_version=EXPORT_OPSET,
            )
    except Exception as exc:  # torch raises many types here; all mean "could not export"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ExportError(f"torch.onnx.export (dynamo) failed for {type(module.lm).__name__} with a KV cache: {type(exc).__name__}: {first}") from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program.")
    proto = program.model_proto
    packed = pack_shared_input_matmuls(proto)
    log.info("packed %d groups of MatMuls sharing an input: %d -> %d MatMuls", packed.groups, packed.matmuls_before, packed.matmuls_after)
    fused = fuse_cached_attention(proto)
    log.info("attention with its KV cache fused in %d of %d layers", fused, layout.layers)
    external = raw_bytes(proto) >= SINGLE_FILE_LIMIT
    path = stage / FILE_NAMES["onnx"]
    data = path.name + ".data"
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data, size_threshold=1024)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise ExportError(f"the exported ONNX model is invalid: {exc}") from exc
    return [path, stage / data] if external else [path]


def _export_torchscript_file(module: KVCacheLM, stage: Path) -> list[Path]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit.trace deprecation and TracerWarnings
            traced = torch.jit.trace(module, example_step(module.layout), check_trace=False, strict=False)  # type: ignore[no-untyped-call]
    except Exception as exc:  # the tracer raises RuntimeError/TypeError/... for unsupported code
        raise ExportError(f"torch.jit.trace failed for {type(module.lm).__name__} with a KV cache: {type(exc).__name__}: {exc}") from exc
    path = stage / FILE_NAMES["torchscript"]
    torch.jit.save(traced, str(path))  # type: ignore[no-untyped-call]
    return [path]


def _rewrite_onnx(
    path: Path, layout: CacheLayout, eager: EagerRunner, quantize: str | None, sparse: bool, check_tokens: int
) -> dict[str, Any]:
    """Quantize and/or sparse-encode the checked float32 ``path`` in place; check the result."""
    import onnx

    from graphprune.exporters.onnx import raw_bytes
    from graphprune.exporters.onnx_sparse import sparsify_initializers

    out: dict[str, Any] = {"quantize": quantize, "float32_bytes": path.stat().st_size}
    reference = OnnxRunner(path, layout) if check_tokens else None
    work = path.with_name("rewritten." + path.name)
    if quantize:
        quantize_int8(path, work)
    proto = onnx.load(str(work if quantize else path))
    if raw_bytes(proto) >= SINGLE_FILE_LIMIT:
        raise ExportError(f"{path.name} is over {SINGLE_FILE_LIMIT:,} bytes; int8 and sparse initializers support single-file models.")
    if sparse:
        out["dense_bytes"] = proto.ByteSize()
        stats = sparsify_initializers(proto, "bitmask")
        out["sparse_initializers"] = stats.bitmask
    onnx.save_model(proto, str(work))
    del proto
    try:
        onnx.checker.check_model(str(work), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise ExportError(f"the rewritten ONNX model is invalid: {exc}") from exc
    if reference is not None:
        candidate = OnnxRunner(work, layout)
        ids, mask = check_prompts(layout.vocab)
        want = generate(reference, ids, mask, max_new_tokens=1, stop_at_eos=False, keep_logits=True)
        got = generate(candidate, ids, mask, max_new_tokens=check_tokens, stop_at_eos=False, keep_logits=True)
        assert want.logits is not None and got.logits is not None
        err = relative_error(got.logits[:, 0].numpy(), want.logits[:, 0].numpy())
        if quantize:
            check_relative(err, INT8_RTOL, "generation file's prefill logits")
            ref = generate(eager, ids, mask, max_new_tokens=check_tokens, stop_at_eos=False)
            same = (ref.tokens == got.tokens).all(dim=0)
            out["int8_equal_tokens"] = int(same.long().cumprod(0).sum())
        elif not err <= 1e-6:
            raise ExportError(f"sparse initializers changed the generation file's logits (relative {err:.3g}); the file was not written.")
        out["relative_error"] = err
        del candidate
    del reference
    os.replace(work, path)
    return out


@dataclass
class GenerationExport:
    """What :func:`export_generation` wrote and how its check went."""

    path: Path
    format: str
    bytes: int
    seconds: float
    check_tokens: int
    max_abs_diff: float | None
    tokens_equal: bool | None
    tie_divergences: list[dict[str, Any]] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)
    quantize: str | None = None
    float32_bytes: int | None = None
    relative_error: float | None = None
    int8_equal_tokens: int | None = None
    sparse_initializers: int = 0
    dense_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def export_generation(
    model: nn.Module,
    out: str | Path,
    *,
    format: GenerationFormat = "onnx",
    tokenizer: Any = None,
    check_tokens: int = 32,
    atol: float = 1e-3,
    overwrite: bool = False,
    quantize: str | None = None,
    sparse_initializers: bool = False,
) -> GenerationExport:
    """Write ``model`` with a KV cache interface to the folder ``out`` (see the module docstring).

    Args:
        model: a Hugging Face causal LM on CPU (graphprune kernels allowed: they are lowered
            to dense Linears in ONNX files and where TorchScript cannot trace them).
        out: the folder to write (created; an existing non-empty folder needs ``overwrite``).
        format: ``"onnx"`` or ``"torchscript"``.
        tokenizer: saved into the folder when given (``graphprune generate`` needs it).
        check_tokens: greedy tokens the file must reproduce from eager PyTorch (0: no check).
        atol: largest accepted absolute logits difference during that check.
        overwrite: replace an existing ``out``.
        quantize: ``"int8"`` (ONNX only): after the float32 file passed its check, replace it
            by its int8 copy (:mod:`graphprune.exporters.quantize`). With ``check_tokens``, the
            int8 file's prefill logits must be within a relative
            :data:`~graphprune.exporters.quantize.INT8_RTOL` of the float file's, and the
            report says for how many greedy steps it keeps eager's tokens.
        sparse_initializers: (ONNX only) store mostly-zero weights compactly (after
            quantization, if any); checked like the file it replaces.

    Raises:
        ExportError: the export, the file's validity, or the decoding check failed; nothing is written.
        OutputError: the folder cannot be written (one line naming it).
    """
    if format not in GENERATION_FORMATS:
        raise ConfigError(f"unknown generation export format {format!r}; choose from {list(GENERATION_FORMATS)}.")
    if check_tokens < 0:
        raise ConfigError(f"check_tokens must be >= 0, got {check_tokens}.")
    check_quantize(quantize, format)
    if sparse_initializers and format != "onnx":
        raise ConfigError("sparse initializers apply to ONNX generation exports only.")
    start = time.perf_counter()
    require_cpu(model)
    check_generation_model(model)
    layout = CacheLayout.probe(model)
    eager = EagerRunner(model, layout)
    with eval_mode(model), torch.no_grad(), atomic_dir(out, overwrite=overwrite) as stage:
        with kernels_lowered(model, only_untraceable=format == "torchscript") as lowered:
            module = KVCacheLM(lowered, layout)
            files = _export_onnx_file(module, stage) if format == "onnx" else _export_torchscript_file(module, stage)
        description: dict[str, Any] = {"format": format, "file": files[0].name, "layout": layout.to_dict(), "model": type(model).__name__}
        write_json(stage / DESCRIPTION, description)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(stage))
        diff: float | None = None
        equal: bool | None = None
        ties: list[dict[str, Any]] = []
        if check_tokens:
            runner = load_runner(stage)
            diff, equal, ties = compare_greedy(eager, runner, check_tokens, atol)
        extra: dict[str, Any] = {}
        if quantize or sparse_initializers:
            extra = _rewrite_onnx(files[0], layout, eager, quantize, sparse_initializers, check_tokens)
            description["quantize"] = quantize
            write_json(stage / DESCRIPTION, description)
        size = sum(p.stat().st_size for p in files)
    final = Path(out)
    log.info("wrote %s (%s, %.1f MiB)", final, format, size / 2**20)
    return GenerationExport(
        path=final / files[0].name,
        format=format,
        bytes=size,
        seconds=time.perf_counter() - start,
        check_tokens=check_tokens,
        max_abs_diff=diff,
        tokens_equal=equal,
        tie_divergences=ties,
        layout=layout.to_dict(),
        **extra,
    )


__all__ = [
    "CacheLayout",
    "DESCRIPTION",
    "GENERATION_FORMATS",
    "GenerationExport",
    "KVCacheLM",
    "export_generation",
    "read_description",
]
