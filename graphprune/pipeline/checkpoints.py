"""Which checkpoint belongs to which job: the key of a pruning job and where its checkpoint lives.

A checkpoint is reused only by the same job: the key hashes every :class:`PruneJob` setting
that changes the pruned weights, the calibration tokens themselves (so the text's content
counts, not its file name), the model's files (size and modification time) and the
graphprune version. Output-only settings (folder, overwrite, evaluation) are left out, so a
resumed run may evaluate or write elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from graphprune.passes.checkpoint import StageCheckpoint
from graphprune.pipeline.jobs import PruneJob

log = logging.getLogger(__name__)

# PruneJob fields that do not change the pruned weights
OUTPUT_ONLY = frozenset({"out", "overwrite", "evaluate", "eval_len", "eval_text", "eval_windows", "resume", "checkpoint", "checkpoint_dir", "text", "lazy"})


def _settings(job: PruneJob) -> dict[str, Any]:
    return {k: v for k, v in asdict(job).items() if k not in OUTPUT_ONLY}


def _model_fingerprint(spec: str) -> list[Any]:
    path = Path(spec).expanduser()
    if not path.exists():
        return [spec]  # built-in names: the name (and the graphprune version) decide the weights
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [str(path.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def job_key(job: PruneJob, calib: Tensor) -> str:
    """SHA-256 hex digest identifying the result of ``job`` on calibration tokens ``calib``."""
    import graphprune

    h = hashlib.sha256()
    h.update(json.dumps(_settings(job), sort_keys=True, default=str).encode())
    h.update(json.dumps(_model_fingerprint(job.model), default=str).encode())
    h.update(graphprune.__version__.encode())
    h.update(str(tuple(calib.shape)).encode())
    h.update(calib.contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_root(job: PruneJob) -> Path | None:
    """``job.checkpoint_dir``, else ``<out>.ckpt`` beside the output folder, else None (no checkpoint)."""
    if not job.checkpoint:
        return None
    if job.checkpoint_dir:
        return Path(job.checkpoint_dir)
    if job.out is None:
        return None
    out = Path(job.out)
    return out.with_name(out.name + ".ckpt")


def open_checkpoint(job: PruneJob, calib: Tensor) -> StageCheckpoint | None:
    """The checkpoint of ``job`` (created, or reopened with ``job.resume``), or None when off."""
    root = checkpoint_root(job)
    if root is None:
        return None
    return StageCheckpoint(root, job_key(job, calib), resume=job.resume, discard=job.overwrite, info=_settings(job))
