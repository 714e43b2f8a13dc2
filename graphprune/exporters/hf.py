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
