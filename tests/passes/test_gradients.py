"""GradientStatsPass: Σ of squared per-sample LM-loss gradients, checked against plain autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphprune.errors import DataError, PassOrderError
from graphprune.models.tiny import random_tokens
from graphprune.passes.gradients import GradientStatsPass
from graphprune.passes.infra import PassContext, PassManager
from graphprune.passes.observe import InsertObserversPass
from graphprune.passes.prune import PruneConfig, SequentialPrunePass
from graphprune.solvers import SparsitySpec


def test_gradients_match_autograd(tiny_gm) -> None:
    calib = random_tokens(3, 16, seed=4)
    gm = PassManager([GradientStatsPass()], PassContext(progress=False, calibration=calib)).run(tiny_gm)
    got = gm.state.grad_sq
    # the pass leaves no gradients behind and restores requires_grad
    assert all(p.grad is None for p in gm.gm.parameters())
    model = gm.model
    names = [li.name for li in gm.block_linears()]
    assert set(got) == set(names)
    expected = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
    for ids in calib.split(1):
        model.zero_grad()
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        for n in names:
            expected[n] += model.get_submodule(n).weight.grad.pow(2)
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-12)
        assert got[n].abs().sum() > 0


def test_gblm_needs_the_gradient_pass(tiny_gm) -> None:
    prune = SequentialPrunePass(PruneConfig("gblm", SparsitySpec(0.5)))
    with pytest.raises(PassOrderError, match="stats.gradients"):
        PassManager([InsertObserversPass(), prune]).check_order()
    PassManager([GradientStatsPass(), InsertObserversPass(), prune]).check_order()


def test_gradient_pass_needs_data(tiny_gm) -> None:
    with pytest.raises(DataError, match="calibration token ids"):
        PassManager([GradientStatsPass()], PassContext(progress=False)).run(tiny_gm)
