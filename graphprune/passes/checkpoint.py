"""Stage checkpoints: what a finished block stage of sequential pruning leaves behind, so a
killed run resumes where it stopped and ends bit-identical to an uninterrupted one.

After each block stage :class:`~graphprune.passes.prune.SequentialPrunePass` saves the
stage's pruned weights and masks (safetensors) and its report entries (JSON) into
``<root>/<key>/``, where ``key`` is a hash of everything that decides the result (job
settings, calibration tokens, model files, graphprune version). On resume, finished stages
load their weights and only run forward (without observers or solvers): the activations
they hand to the next stage are recomputed deterministically, so the stages that remain
see exactly the inputs they would have seen.

Writes are atomic (:mod:`graphprune.fileio`: temporary file, ``fsync``, ``os.replace``); a
stage counts as finished only once its JSON, written last and carrying the SHA-256 of its
tensor file, is in place. A write that fails (no space, no permission) ends as one
:class:`~graphprune.errors.OutputError` and leaves no temporary behind; the stages finished
before it stay, for ``--resume``, and a checkpoint with none is removed. Nothing is
unpickled: tensors go through safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from graphprune import fileio
from graphprune.errors import ConfigError, OutputError

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
#: the setting that chooses where checkpoints go (named in error messages)
OPTION = "--checkpoint-dir"


@dataclass
class StageRecord:
    """One finished block stage.

    Attributes:
        block: block index.
        weights: Linear (module) name -> pruned weight ``[out, in]``.
        masks: Linear name -> boolean keep-mask ``[out, in]``.
        layers: the stage's per-Linear report entries.
        stage: the stage's report entry (seconds, peak RSS...).
    """

    block: int
    weights: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    stage: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    fileio.write_json(path, data, indent=1, default=str, option=OPTION)


class StageCheckpoint:
    """Finished stages of one pruning job in ``root/<key[:16]>/``.

    Args:
        root: checkpoint folder (by default ``<out>.ckpt`` beside the output folder).
        key: hex digest identifying the job (see ``graphprune.pipeline.checkpoints.job_key``).
        resume: use stages already there; if False, an existing checkpoint of this job is
            an error unless ``discard`` (it is an interrupted run the user may want back).
        discard: start over, deleting an existing checkpoint of this job.
        info: JSON-serialisable description of the job, kept in the manifest.
    """

    def __init__(self, root: str | os.PathLike[str], key: str, *, resume: bool = False, discard: bool = False, info: Any = None) -> None:
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key[:16]
        self.resume = resume
        manifest = self.dir / MANIFEST
        if self.dir.exists() and not resume:
            if not discard and manifest.is_file() and self.finished():
                raise ConfigError(
                    f"{self.dir} holds a checkpoint of this job from an interrupted run ({len(self.finished())} stage(s) done); "
                    "pass --resume to continue it or --overwrite to start over."
                )
            shutil.rmtree(self.dir)
        if self.dir.exists():
            try:
                stored = json.loads(manifest.read_text())
            except (OSError, ValueError):
                stored = {}
            if stored.get("key") != key or stored.get("format") != FORMAT:
                log.warning("checkpoint %s does not match this job; starting over", self.dir)
                shutil.rmtree(self.dir)
        self._created: list[Path] = []  # folders this run made (removed again if it checkpoints nothing)
        if not self.dir.exists():
            self._created = fileio.make_dirs(self.dir, option=OPTION)
            with self._cleanup_on_failure():
                _write_json(manifest, {"format": FORMAT, "key": key, "job": info})
        elif resume:
            log.info("resuming from %s: %d finished stage(s)", self.dir, len(self.finished()))

    @contextmanager
    def _cleanup_on_failure(self) -> Iterator[None]:
        """When a write fails: with no finished stage there is nothing to resume, so remove the
        checkpoint (and the folders made for it); with some, keep them and say so."""
        try:
            yield
        except OutputError as exc:
            done = len(self.finished()) if self.dir.is_dir() else 0
            if done:
                kept = f"{done} finished stage{'s are' if done > 1 else ' is'} kept in {self.dir} for --resume"
                raise OutputError(f"{str(exc).rstrip('.')}; {kept}.") from exc.__cause__
            shutil.rmtree(self.dir, ignore_errors=True)
            fileio.remove_dirs(self._created)
            raise

    def _files(self, block: int) -> tuple[Path, Path]:
        return self.dir / f"block-{block:04d}.safetensors", self.dir / f"block-{block:04d}.json"

    def finished(self) -> list[int]:
        """Blocks with a complete record, ascending."""
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("block-*.json"))

    def load(self, block: int) -> StageRecord | None:
        """The record of ``block`` if it is complete and intact (only when resuming)."""
        if not self.resume:
            return None
        tensors_path, json_path = self._files(block)
        if not json_path.is_file() or not tensors_path.is_file():
            return None
        try:
            meta = json.loads(json_path.read_text())
        except ValueError:
            log.warning("checkpoint record %s is unreadable; recomputing block %d", json_path, block)
            return None
        if meta.get("sha256") != _sha256(tensors_path):
            log.warning("checkpoint tensors %s do not match their record; recomputing block %d", tensors_path, block)
            return None
        tensors = load_file(str(tensors_path))
        rec = StageRecord(block, layers=meta["layers"], stage=meta["stage"])
        for name in meta["linears"]:
            rec.weights[name] = tensors[f"weight:{name}"]
            rec.masks[name] = tensors[f"mask:{name}"]
        return rec

    def save(self, rec: StageRecord) -> None:
        """Write ``rec`` atomically: tensors first, then the JSON that marks it complete."""
        tensors_path, json_path = self._files(rec.block)
        tensors = {f"weight:{n}": w.detach().contiguous() for n, w in rec.weights.items()}
        tensors.update({f"mask:{n}": m.contiguous() for n, m in rec.masks.items()})
        with self._cleanup_on_failure():
            with fileio.output_errors(json_path, option=OPTION):
                json_path.unlink(missing_ok=True)  # a stale record must not vouch for new tensors
            with fileio.atomic_path(tensors_path, option=OPTION) as tmp:
                save_file(tensors, str(tmp))
            meta = {
                "block": rec.block, "linears": sorted(rec.weights), "layers": rec.layers, "stage": rec.stage,
                "sha256": _sha256(tensors_path),
            }
            _write_json(json_path, meta)

    def remove(self) -> None:
        """Delete this job's checkpoint (and the root folder if nothing else is in it)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:
            pass
