"""The calibration observer's statistics against closed-form float64 answers."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from graphprune.errors import SolverError
from graphprune.passes.observe import XTX_BAND, InputObserver, xtx_macs


@pytest.mark.parametrize("width", [7, XTX_BAND, XTX_BAND + 1, 2 * XTX_BAND + 77])
def test_banded_xtx_equals_the_full_product_and_is_symmetric(width) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, width), torch.randn(3, 4, width)]
    obs = InputObserver("x", width, hessian=True)
    obs.enabled = True
    for x in batches:
        assert obs(x) is x  # an identity in the graph
    st = obs.stats()
    flat = torch.cat([x.reshape(-1, width) for x in batches]).double()
    assert st.count == flat.shape[0]
    assert st.xtx is not None
    torch.testing.assert_close(st.xtx, flat.T @ flat, rtol=1e-5, atol=1e-4)
    assert torch.equal(st.xtx, st.xtx.T)  # the lower triangle is the mirrored upper one, exactly
    torch.testing.assert_close(st.col_sq, flat.pow(2).sum(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(st.col_sum, flat.sum(0), rtol=1e-6, atol=1e-5)


def test_counted_multiply_adds_are_what_the_observer_performs() -> None:
    width, tokens = 2 * XTX_BAND + 77, 64
    obs = InputObserver("x", width, hessian=True)
    obs.enabled = True
    with FlopCounterMode(display=False) as counter:
        obs(torch.randn(tokens, width))
    matmul = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op).split(".")[1] == "mm") / 2
    assert matmul == xtx_macs(width, tokens)
    assert xtx_macs(width, tokens) < 0.75 * tokens * width * width  # the symmetric half, plus the diagonal bands


def test_handed_over_statistics_are_not_overwritten_by_the_next_stage() -> None:
    obs = InputObserver("x", 6, hessian=True)
    obs.enabled = True
    x = torch.randn(10, 6)
    obs(x)
    st = obs.stats(copy=False)
    obs.release()
    with pytest.raises(SolverError, match="saw no calibration tokens"):
        obs.stats()
    obs.reset()
    obs(torch.randn(10, 6) * 100)
    torch.testing.assert_close(st.xtx, (x.T @ x).double(), rtol=1e-5, atol=1e-5)
