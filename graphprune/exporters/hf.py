"""Hugging Face model folder writer (config, safetensors weights, tokenizer, report).

The folder is written to a temporary sibling and renamed into place, so an interrupted
run never leaves a half-written model; an existing folder is refused unless
``overwrite`` is set.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from torch import nn

from graphprune.errors import ExportError
from graphprune.kernels import kernels_lowered

log = logging.getLogger(__name__)


def check_output_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse an existing non-empty output folder unless ``overwrite`` (before any work is done)."""
    path = Path(out)
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise ExportError(f"output {path} already exists; choose another --out or pass --overwrite.")
    return path


@contextmanager
def atomic_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only if the block succeeds."""
    final = check_output_dir(out, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


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
    unchanged; the model keeps its kernels afterwards.

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
            lowered.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)
    log.info("wrote %s", out)
    return Path(out)


class ShardedWriter:
    """Writes a model folder piece by piece: one safetensors shard per finished stage.

    Used by lazy (stage-at-a-time) pruning, where the whole model is never in memory. The
    shards go to a temporary sibling of ``out``; :meth:`finish` names them
    ``model-0000i-of-0000n.safetensors``, writes ``model.safetensors.index.json``, the
    config, generation config and tokenizer, then renames the folder into place.
    :meth:`abort` (or an exception inside ``with``) removes everything written so far.
    """

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.out = Path(out)
        self._ctx = atomic_dir(out, overwrite)
        self.tmp = self._ctx.__enter__()
        self._parts: list[tuple[Path, list[str], int]] = []
        self._open = True

    def add(self, tensors: Mapping[str, Any]) -> None:
        """Write ``name -> tensor`` as the next shard (tensors are copied to contiguous CPU)."""
        from safetensors.torch import save_file

        if not tensors:
            return
        path = self.tmp / f".part-{len(self._parts):05d}.safetensors"
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(data, str(path), metadata={"format": "pt"})
        self._parts.append((path, sorted(data), sum(t.numel() * t.element_size() for t in data.values())))

    def finish(self, model: nn.Module, tokenizer: Any, extra_json: Mapping[str, Any] | None = None) -> Path:
        """Name the shards, write the index, config and tokenizer, and move the folder into place."""
        total = len(self._parts)
        weight_map: dict[str, str] = {}
        for i, (path, names, _) in enumerate(self._parts):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(path, self.tmp / final)
            weight_map.update({n: final for n in names})
        write_json(
            self.tmp / "model.safetensors.index.json",
            {"metadata": {"total_size": sum(size for _, _, size in self._parts)}, "weight_map": dict(sorted(weight_map.items()))},
        )
        model.config.save_pretrained(self.tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(self.tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(self.tmp)
        for name, data in (extra_json or {}).items():
            write_json(self.tmp / name, data)
        self._open = False
        self._ctx.__exit__(None, None, None)
        log.info("wrote %s (%d shards)", self.out, total)
        return self.out

    def abort(self) -> None:
        """Remove the partial folder (the previous ``out``, if any, is untouched)."""
        if self._open:
            self._open = False
            err = ExportError("aborted")
            try:
                self._ctx.__exit__(ExportError, err, None)
            except ExportError:
                pass
