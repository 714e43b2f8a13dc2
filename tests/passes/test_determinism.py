"""Determinism: the same model, calibration tokens and settings give bit-identical saved weights.

Across processes and with a resume in between this is also checked end to end in
tests/recipes/test_recipe_run.py; here two plain runs on the same captured graph.
"""
from __future__ import annotations

import hashlib

import pytest

from graphprune.exporters.hf import save_hf_folder
from graphprune.models.tiny import random_tokens
from graphprune.passes.infra import PassContext, PassManager
from graphprune.passes.prune import PruneConfig, parse_rules, prune_pass
from graphprune.solvers import SparsitySpec


@pytest.mark.parametrize("tiny_name", ["tiny-llama"])
def test_two_runs_save_bit_identical_weights(tiny_gm, tmp_path) -> None:
    spec = SparsitySpec(0.6)
    hashes = []
    for run in range(2):
        gm = tiny_gm.clone()
        config = PruneConfig("sparsegpt", spec, parse_rules({"*.down_proj": "2:4"}, spec), batch_size=3)
        ctx = PassContext(seed=0, progress=False, calibration=random_tokens(6, 24, seed=2))
        gm = PassManager([prune_pass(config)], ctx).run(gm)
        save_hf_folder(gm.model, None, tmp_path / f"run{run}")
        hashes.append(hashlib.sha256((tmp_path / f"run{run}" / "model.safetensors").read_bytes()).hexdigest())
    assert hashes[0] == hashes[1]
