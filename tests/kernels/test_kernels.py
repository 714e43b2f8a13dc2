"""Every kernel computes F.linear exactly (to float rounding) and lowers to an identical nn.Linear."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.errors import ConfigError
from graphprune.kernels import (
    BSRLinear,
    CSRLinear,
    DenseLinear,
    KernelLinear,
    KernelUnavailableError,
    SemiStructuredLinear,
    choose_blocksize,
    has_kernels,
    is_n_m_sparse,
    kernels_lowered,
    lower_kernels,
    zero_block_fraction,
)
from graphprune.models.tiny import random_tokens, tiny_llama

OUT, IN = 64, 128


def _weight(kind: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=gen) * 0.1
    if kind == "2:4":
        groups = w.reshape(OUT, -1, 4)
        groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
    elif kind == "50%":
        w[torch.rand(OUT, IN, generator=gen) < 0.5] = 0.0
    elif kind == "block":
        keep = torch.rand(OUT // 8, IN // 8, generator=gen) < 0.3
        w = w * keep.repeat_interleave(8, 0).repeat_interleave(8, 1)
    return w


def _bias(seed: int = 1) -> torch.Tensor:
    return torch.randn(OUT, generator=torch.Generator().manual_seed(seed)) * 0.1


CPU_KERNELS = {
    "dense": DenseLinear.from_linear,
    "csr": CSRLinear.from_linear,
    # min_zero_blocks=0 accepts any weight, so BSR is checked on every pattern, not only block-sparse
    "bsr": lambda w, b: BSRLinear.from_linear(w, b, blocksize=4, min_zero_blocks=0.0),
}


@pytest.mark.parametrize("pattern", ["2:4", "50%", "block"])
@pytest.mark.parametrize("kind", sorted(CPU_KERNELS))
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_matches_f_linear_on_3d_inputs(kind: str, pattern: str, with_bias: bool) -> None:
    w, b = _weight(pattern), (_bias() if with_bias else None)
    module = CPU_KERNELS[kind](w, b)
    assert isinstance(module, KernelLinear) and module.kind == kind
    x = torch.randn(3, 7, IN, generator=torch.Generator().manual_seed(2))
    y = module(x)
    assert y.shape == (3, 7, OUT)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=0)
    torch.testing.assert_close(module.dense_weight(), w, atol=0, rtol=0)
    assert not any(True for _ in module.parameters())  # kernels hold buffers only


@pytest.mark.parametrize("kind", sorted(CPU_KERNELS))
def test_to_linear_is_identical(kind: str) -> None:
    w, b = _weight("50%"), _bias()
    linear = CPU_KERNELS[kind](w, b).to_linear()
    assert isinstance(linear, nn.Linear)
    assert torch.equal(linear.weight, w) and torch.equal(linear.bias, b)


def test_bsr_chooses_largest_block_with_enough_zero_blocks() -> None:
    w = _weight("block")  # zero 8x8 tiles on ~70 % of the grid
    size, frac = choose_blocksize(w)
    assert size in (8, 4) and frac >= 0.5
    assert zero_block_fraction(w, 8) == pytest.approx(frac if size == 8 else zero_block_fraction(w, 8))
    module = BSRLinear.from_linear(w)
    assert module.blocksize == size


def test_bsr_refuses_unstructured_sparsity_with_reason() -> None:
    w = _weight("50%")
    reason = BSRLinear.unavailable_reason(w, device=torch.device("cpu"), dtype=torch.float32)
    assert reason and "all-zero blocks" in reason
    with pytest.raises(KernelUnavailableError, match="all-zero blocks"):
        BSRLinear.from_linear(w)


def test_cpu_sparse_kernels_refuse_half_precision() -> None:
    w = _weight("50%").half()
    with pytest.raises(KernelUnavailableError, match="float32/float64"):
        CSRLinear.from_linear(w)
    assert "float32/float64" in BSRLinear.unavailable_reason(w, device=torch.device("cpu"), dtype=torch.float16)


def test_bias_shape_is_checked() -> None:
    with pytest.raises(ConfigError, match="bias has shape"):
        DenseLinear.from_linear(_weight("dense"), torch.zeros(OUT + 1))


def test_is_n_m_sparse() -> None:
    assert is_n_m_sparse(_weight("2:4"), 2, 4)
    assert not is_n_m_sparse(_weight("dense"), 2, 4)


def test_semi_structured_explains_refusals_on_any_machine() -> None:
    dense = _weight("dense").half()
    with pytest.raises(KernelUnavailableError, match="not 2:4 sparse"):
        SemiStructuredLinear.from_linear(dense)
    reason = SemiStructuredLinear.unavailable_reason(
        _weight("2:4").half(), device=torch.device("cpu"), dtype=torch.float16
    )
    assert reason and "CUDA" in reason
    reason = SemiStructuredLinear.unavailable_reason(_weight("2:4"), device=torch.device("cpu"), dtype=torch.float32)
    assert reason and "float16 or bfloat16" in reason


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="SemiStructuredLinear needs a CUDA device (torch.cuda.is_available() is False)",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_matches_f_linear_on_cuda(dtype: torch.dtype) -> None:
    w = _weight("2:4").to("cuda", dtype)
    b = _bias().to("cuda", dtype)
    module = SemiStructuredLinear.from_linear(w, b)
    x = torch.randn(3, 8, IN, device="cuda", dtype=dtype)
    ref = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(module(x).float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(module.dense_weight(), w, atol=0, rtol=0)
    assert torch.equal(module.to_linear().weight, w)


def _with_kernels() -> nn.Module:
    model = tiny_llama()
    mlp0, attn1 = model.model.layers[0].mlp, model.model.layers[1].self_attn
    mlp0.down_proj = CSRLinear.from_module(mlp0.down_proj)
    mlp0.up_proj = BSRLinear.from_linear(mlp0.up_proj.weight, blocksize=8, min_zero_blocks=0.0)
    attn1.q_proj = DenseLinear.from_module(attn1.q_proj)
    return model


def test_lower_kernels_gives_identical_outputs() -> None:
    model = _with_kernels()
    ids = random_tokens(2, 12, seed=3)
    with torch.no_grad():
        dense = tiny_llama()(ids).logits  # the same weights, never converted
        with_kernels = model(ids).logits
        lowered = lower_kernels(model)
        after = lowered(ids).logits
    assert lowered is model and not has_kernels(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert torch.equal(after, dense)  # bit for bit: same weights, same dense ops
    torch.testing.assert_close(with_kernels, dense, atol=1e-5, rtol=0)  # sparse sums reorder


def test_kernels_lowered_restores_the_kernels() -> None:
    model = _with_kernels()
    kernel = model.model.layers[0].mlp.down_proj
    with kernels_lowered(model) as lowered:
        assert not has_kernels(lowered)
    assert model.model.layers[0].mlp.down_proj is kernel
    with kernels_lowered(model, only_untraceable=True):
        assert model.model.layers[0].mlp.down_proj is kernel  # CSR traces, so it stays


def test_lower_kernels_on_a_bare_kernel_returns_linear() -> None:
    w = _weight("50%")
    linear = lower_kernels(CSRLinear.from_linear(w))
    assert isinstance(linear, nn.Linear) and torch.equal(linear.weight, w)


def test_kernels_survive_deepcopy_and_state_dict() -> None:
    module = CSRLinear.from_linear(_weight("50%"), _bias())
    clone = copy.deepcopy(module)
    x = torch.randn(4, IN)
    torch.testing.assert_close(clone(x), module(x), atol=0, rtol=0)
    bsr = BSRLinear.from_linear(_weight("block"), _bias())
    assert set(bsr.state_dict()) == {"bias", "crow_indices", "col_indices", "values"}


@pytest.mark.parametrize("kind", sorted(CPU_KERNELS))
def test_kernels_trace_with_dynamic_leading_dims(kind: str, tmp_path) -> None:
    module = CPU_KERNELS[kind](_weight("block"), _bias())
    traced = torch.jit.trace(module, (torch.randn(2, 5, IN),), check_trace=False)
    traced.save(str(tmp_path / "k.pt"))
    loaded = torch.jit.load(str(tmp_path / "k.pt"))
    x = torch.randn(3, 9, IN)
    torch.testing.assert_close(loaded(x), module(x), atol=1e-6, rtol=0)
