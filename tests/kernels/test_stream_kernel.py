"""StreamLinear: graphprune's dense decode kernel equals F.linear, shares its weight, and rides through compile/export."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphprune.errors import ConfigError
from graphprune.kernels import KERNELS, StreamLinear, packed_available, packed_unavailable_reason

pytestmark = pytest.mark.skipif(
    not packed_available(), reason=f"the native kernel library is unavailable here: {packed_unavailable_reason()}"
)


@pytest.mark.parametrize(("out", "inp"), [(7, 37), (64, 100), (33, 576), (5, 16), (1, 1)])
@pytest.mark.parametrize("tokens", [1, 3, 8, 11, 20])
def test_equals_dense_matmul(out: int, inp: int, tokens: int) -> None:
    gen = torch.Generator().manual_seed(out * 1000 + inp + tokens)
    w = torch.randn(out, inp, generator=gen) / inp**0.5
    b = torch.randn(out, generator=gen)
    x = torch.randn(2, tokens, inp, generator=gen)
    kernel = StreamLinear(w, b)
    torch.testing.assert_close(kernel(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(StreamLinear(w)(x[0]), F.linear(x[0], w), rtol=1e-5, atol=1e-5)


def test_shares_the_weight_and_is_a_registered_kind() -> None:
    w = torch.randn(12, 40)
    kernel = StreamLinear.from_linear(w)
    assert kernel.weight.data_ptr() == w.data_ptr()  # no copy: a tied LM head stays one tensor
    assert KERNELS["stream"] is StreamLinear and kernel.to_linear().weight.data_ptr() != w.data_ptr()
    with pytest.raises(ConfigError, match="expects inputs"):
        kernel(torch.randn(2, 39))


def test_export_compile_and_trace() -> None:
    w, b = torch.randn(24, 40), torch.randn(24)
    kernel = StreamLinear(w, b)
    x = torch.randn(3, 40)
    exported = torch.export.export(kernel, (x,))
    assert "graphprune.dense_linear" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    traced = torch.jit.trace(kernel, x)
    torch.testing.assert_close(traced(torch.randn(5, 40) * 0 + x[:1]), F.linear(x[:1], w, b).expand(5, 24), rtol=1e-5, atol=1e-5)
