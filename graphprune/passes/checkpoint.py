"""Stage checkpoints: what a finished block stage of sequential pruning leaves behind, so a
killed run resumes where it stopped and ends bit-identical to an uninterrupted one.

After each block stage :class:`~graphprune.passes.prune.SequentialPrunePass` saves the
stage's pruned weights and masks (safetensors) and its report entries (JSON) into
``<root>/<key>/``, where ``key`` is a hash of everything that decides the result (job
settings, calibration tokens, model files, graphprune version). On resume, finished stages
load their weights and only run forward (without observers or solvers): the activations
they hand to the next stage are recomputed deterministically, so the stages that remain
see exactly the inputs they would have seen.

Writes are atomic (temporary file + ``os.replace``); a stage counts as finished only once
its JSON, written last and carrying the SHA-256 of its tensor file, is in place. Nothing
is unpickled: tensors go through safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from graphprune.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"


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
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        if not self.dir.exists():
            self.dir.mkdir(parents=True)
            _write_json(manifest, {"format": FORMAT, "key": key, "job": info})
        elif resume:
            log.info("resuming from %s: %d finished stage(s)", self.dir, len(self.finished()))

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
        json_path.unlink(missing_ok=True)  # a stale record must not vouch for new tensors
        tensors = {f"weight:{n}": w.detach().contiguous() for n, w in rec.weights.items()}
        tensors.update({f"mask:{n}": m.contiguous() for n, m in rec.masks.items()})
        tmp = tensors_path.with_name(f".{tensors_path.name}.tmp")
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, tensors_path)
        meta = {"block": rec.block, "linears": sorted(rec.weights), "layers": rec.layers, "stage": rec.stage, "sha256": _sha256(tensors_path)}
        _write_json(json_path, meta)

    def remove(self) -> None:
        """Delete this job's checkpoint (and the root folder if nothing else is in it)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:
            pass
