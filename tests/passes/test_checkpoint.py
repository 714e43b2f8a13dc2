"""Stage checkpoints on their own: atomic records, what counts as finished, when to refuse."""
from __future__ import annotations

import json

import pytest
import torch

from graphprune.errors import ConfigError
from graphprune.passes.checkpoint import StageCheckpoint, StageRecord


def _record(block: int) -> StageRecord:
    g = torch.Generator().manual_seed(block)
    w = torch.randn(8, 16, generator=g)
    mask = w.abs() > 0.5
    return StageRecord(block, {"l.q": w * mask}, {"l.q": mask}, [{"name": "l.q", "sparsity": 0.6}], {"block": block, "seconds": 0.1})


def test_save_then_resume_gives_back_the_exact_tensors(tmp_path) -> None:
    ck = StageCheckpoint(tmp_path / "ck", "ab" * 32)
    ck.save(_record(0))
    ck.save(_record(1))
    assert ck.finished() == [0, 1]
    assert ck.load(0) is None  # not resuming: nothing is reused
    again = StageCheckpoint(tmp_path / "ck", "ab" * 32, resume=True)
    rec = again.load(1)
    assert rec is not None and rec.layers == _record(1).layers and rec.stage == _record(1).stage
    assert torch.equal(rec.weights["l.q"], _record(1).weights["l.q"]) and rec.masks["l.q"].dtype == torch.bool
    assert again.load(2) is None
    again.remove()
    assert not (tmp_path / "ck").exists()


def test_incomplete_or_corrupt_stages_are_recomputed(tmp_path) -> None:
    ck = StageCheckpoint(tmp_path, "cd" * 32)
    ck.save(_record(0))
    ck.save(_record(1))
    ck.save(_record(2))
    (ck.dir / "block-0001.json").unlink()  # killed between the tensors and the record
    tensors = ck.dir / "block-0002.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")  # torn write
    again = StageCheckpoint(tmp_path, "cd" * 32, resume=True)
    assert again.load(0) is not None and again.load(1) is None and again.load(2) is None


def test_an_interrupted_run_is_not_silently_discarded(tmp_path) -> None:
    StageCheckpoint(tmp_path, "ef" * 32).save(_record(0))
    with pytest.raises(ConfigError, match="pass --resume to continue it or --overwrite to start over"):
        StageCheckpoint(tmp_path, "ef" * 32)
    fresh = StageCheckpoint(tmp_path, "ef" * 32, discard=True)
    assert fresh.finished() == []
    # another job's key never sees this one's stages
    StageCheckpoint(tmp_path, "ef" * 32).save(_record(0))
    assert StageCheckpoint(tmp_path, "01" * 32, resume=True).finished() == []


def test_manifest_of_another_job_is_replaced(tmp_path) -> None:
    ck = StageCheckpoint(tmp_path, "aa" * 32)
    ck.save(_record(0))
    manifest = ck.dir / "manifest.json"
    manifest.write_text(json.dumps({"format": 1, "key": "aa" * 16 + "bb" * 16}))  # same prefix, other job
    again = StageCheckpoint(tmp_path, "aa" * 32, resume=True)
    assert again.finished() == [] and json.loads(manifest.read_text())["key"] == "aa" * 32


def test_a_failed_write_leaves_no_temporaries_and_keeps_finished_stages(tmp_path, monkeypatch) -> None:
    """No space for a stage: with nothing finished the checkpoint goes away entirely (nothing to
    resume); with finished stages they stay intact and the message says --resume continues."""
    import errno

    from safetensors import SafetensorError

    import graphprune.passes.checkpoint as checkpoint_module
    from graphprune.errors import OutputError

    real_save = checkpoint_module.save_file

    def full_disk(tensors, filename, *args, **kwargs):  # what safetensors (Rust) raises on ENOSPC
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error {errno.ENOSPC})")

    root = tmp_path / "new" / "ck"
    ck = StageCheckpoint(root, "12" * 32)
    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    message = r"block-0000\.safetensors: No space left on device; free space or choose another --checkpoint-dir\.$"
    with pytest.raises(OutputError, match=message):
        ck.save(_record(0))
    assert list(tmp_path.iterdir()) == []  # the folders made for the checkpoint are gone too

    ck = StageCheckpoint(root, "12" * 32)
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    ck.save(_record(0))
    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(OutputError, match=r"1 finished stage is kept in .+ for --resume\.$"):
        ck.save(_record(1))
    assert sorted(p.name for p in ck.dir.iterdir()) == ["block-0000.json", "block-0000.safetensors", "manifest.json"]
    again = StageCheckpoint(root, "12" * 32, resume=True)
    assert again.finished() == [0] and torch.equal(again.load(0).weights["l.q"], _record(0).weights["l.q"])
