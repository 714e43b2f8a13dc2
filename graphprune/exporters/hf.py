"""Hugging Face model folder writer (config, safetensors weights, tokenizer, report).

The folder is written to a temporary sibling and renamed into place, so an interrupted
run never leaves a half-written model; an existing folder is refused unless
``overwrite`` is set.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from torch import nn

from graphprune import fileio
from graphprune.errors import ExportError
from graphprune.kernels import has_kernels, kernels_lowered
from graphprune.kernels.regime import plan_of, write_plan
from graphprune.models.shapes import SHAPES_FILE, write_shapes

log = logging.getLogger(__name__)


def check_output_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse an existing non-empty output folder unless ``overwrite`` (before any work is done)."""
    path = Path(out)
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise ExportError(f"output {path} already exists; choose another --out or pass --overwrite.")
    return path


@contextmanager
def atomic_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder that replaces ``out`` only if the block succeeds (:func:`graphprune.fileio.atomic_dir`).

    Write failures (no space, no permission) end as one :class:`~graphprune.errors.OutputError`,
    with the staging folder removed and an existing ``out`` untouched.
    """
    check_output_dir(out, overwrite)
    with fileio.atomic_dir(out, overwrite=overwrite) as tmp:
        yield tmp


def _write_json(path: Path, data: Any) -> None:
    """A JSON file inside a staging folder (the folder as a whole is what appears atomically)."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def save_hf_folder(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    extra_json: Mapping[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``model`` (a transformers PreTrainedModel) as a loadable folder.

    Sparse kernels (``graphprune.kernels``) are lowered to ``nn.Linear`` while saving, so
    the folder holds plain dense weights (zeros where pruned) that ``transformers`` loads
    unchanged; the model keeps its kernels afterwards, and the choice of kernels is written
    as ``graphprune_kernels.json`` (:mod:`graphprune.kernels.regime`), which graphprune
    re-applies when it runs the folder for generation.

    Args:
        model: the model; its weights are what the pipeline pruned.
        tokenizer: saved beside it (``save_pretrained``), when it has that method.
        out: the folder.
        overwrite: replace an existing folder.
        extra_json: more files to write, name -> JSON-serialisable data (e.g. ``report.json``).
        extra: called with the staging folder after the model is written and before
            ``extra_json``, to add files (exports, benchmarks) that appear with the model or not at all.
    """
    if not hasattr(model, "save_pretrained"):
        raise ExportError(f"{type(model).__name__} is not a transformers model; cannot write a model folder.")
    with atomic_dir(out, overwrite) as tmp:
        with kernels_lowered(model) as lowered:
            cast(Any, lowered).save_pretrained(tmp, safe_serialization=True)  # a transformers model (checked above)
            if write_shapes(tmp, lowered):
                log.info("%s: some layers' widths differ from the config; wrote %s (graphprune loads the folder)", out, SHAPES_FILE)
        if has_kernels(model):  # the kernel choice, re-applied when graphprune loads the folder for generation
            write_plan(tmp, plan_of(model))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        for name, data in (extra_json or {}).items():
            _write_json(tmp / name, data)
    log.info("wrote %s", out)
    return Path(out)


class ShardedWriter:
    """Writes a model folder piece by piece: one safetensors shard per finished stage.

    Used by lazy (stage-at-a-time) pruning, where the whole model is never in memory. The
    shards go to a temporary sibling of ``out`` (a :class:`graphprune.fileio.StagedDir`);
    :meth:`finish` names them ``model-0000i-of-0000n.safetensors``, writes
    ``model.safetensors.index.json``, the config, generation config and tokenizer, then
    renames the folder into place. :meth:`abort`, or any failure of :meth:`add` or
    :meth:`finish` (a full disk ends as one :class:`~graphprune.errors.OutputError`),
    removes everything written so far; an existing ``out`` is untouched.
    """

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.out = Path(out)
        check_output_dir(out, overwrite)
        self._staged = fileio.StagedDir(out, overwrite=overwrite)
        self.tmp = self._staged.path
        self._parts: list[tuple[Path, list[str], int]] = []

    def add(self, tensors: Mapping[str, Any]) -> None:
        """Write ``name -> tensor`` as the next shard (tensors are copied to contiguous CPU)."""
        from safetensors.torch import save_file

        if not tensors:
            return
        path = self.tmp / f".part-{len(self._parts):05d}.safetensors"
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        try:
            with self._staged.errors():
                save_file(data, str(path), metadata={"format": "pt"})
        except BaseException:
            self.abort()
            raise
        self._parts.append((path, sorted(data), sum(t.numel() * t.element_size() for t in data.values())))

    def finish(self, model: nn.Module, tokenizer: Any, extra_json: Mapping[str, Any] | None = None) -> Path:
        """Name the shards, write the index, config and tokenizer, and move the folder into place."""
        try:
            with self._staged.errors():
                self._complete(model, tokenizer, extra_json)
        except BaseException:
            self.abort()
            raise
        self._staged.commit()
        log.info("wrote %s (%d shards)", self.out, len(self._parts))
        return self.out

    def _complete(self, model: nn.Module, tokenizer: Any, extra_json: Mapping[str, Any] | None) -> None:
        total = len(self._parts)
        weight_map: dict[str, str] = {}
        for i, (path, names, _) in enumerate(self._parts):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            try:
                os.replace(path, self.tmp / final)
            except OSError as exc:  # named as the shard it was to become, not the hidden part file
                raise OSError(exc.errno, exc.strerror, str(self.tmp / final)) from exc
            weight_map.update({n: final for n in names})
        _write_json(
            self.tmp / "model.safetensors.index.json",
            {"metadata": {"total_size": sum(size for _, _, size in self._parts)}, "weight_map": dict(sorted(weight_map.items()))},
        )
        cast(Any, model).config.save_pretrained(self.tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(self.tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(self.tmp)
        for name, data in (extra_json or {}).items():
            _write_json(self.tmp / name, data)

    def abort(self) -> None:
        """Remove the partial folder (the previous ``out``, if any, is untouched); safe to call twice."""
        self._staged.discard()
