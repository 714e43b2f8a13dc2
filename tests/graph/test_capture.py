"""Capture: the traced graph computes exactly the eager model's logits, for any batch/length."""
from __future__ import annotations

import pytest
import torch

from graphprune.errors import CaptureError
from graphprune.graph.capture import capture
from graphprune.graph.model import GraphModel
from graphprune.models.tiny import random_tokens


@pytest.mark.parametrize("shape", [(1, 2), (2, 16), (3, 37)])
def test_capture_matches_eager(tiny_model: torch.nn.Module, shape: tuple[int, int]) -> None:
    gm = GraphModel.capture(tiny_model)
    ids = random_tokens(*shape, seed=shape[1])
    with torch.no_grad():
        eager = tiny_model(input_ids=ids, use_cache=False).logits
    assert (gm(ids) - eager).abs().max() <= 1e-5


def test_capture_shares_weights(tiny_model: torch.nn.Module) -> None:
    gm = GraphModel.capture(tiny_model)
    li = gm.block_linears()[0]
    param = dict(tiny_model.named_parameters())[li.param_name]
    assert gm.get_attr(li.weight).data_ptr() == param.data_ptr()
    gm.set_weight(li.weight, torch.zeros_like(param))
    assert param.abs().sum() == 0


def test_capture_error_names_the_problem() -> None:
    class Bad(torch.nn.Module):
        config = None

        def forward(self, input_ids, use_cache=False):
            if input_ids.sum() > 0:  # data-dependent control flow cannot be exported
                return type("O", (), {"logits": input_ids.float()})()
            return type("O", (), {"logits": -input_ids.float()})()

    with pytest.raises(CaptureError, match="could not capture Bad"):
        capture(Bad(), random_tokens(1, 4))


@pytest.mark.slow
def test_default_model_capture(default_model) -> None:
    gm = GraphModel.capture(default_model.model, name="smollm2-135m")
    ids = random_tokens(1, 12, seed=3, vocab=gm.vocab_size)
    with torch.no_grad():
        eager = default_model.model(input_ids=ids, use_cache=False).logits
    assert (gm(ids) - eager).abs().max() <= 1e-5
    s = gm.summary()
    assert len(s["blocks"]) == 30 and s["block_linears"] == 30 * 7
    assert len(s["norms"]) == 61 and s["lm_head"] == "lm_head"
