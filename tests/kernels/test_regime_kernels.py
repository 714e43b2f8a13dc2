"""Kernels per regime (decode / prefill): the measured choice, the dispatch, and kernel plans."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from graphprune.errors import ConfigError
from graphprune.kernels import CSRLinear, DenseLinear, KernelLinear
from graphprune.kernels.regime import PLAN_FILE, RegimeLinear, apply_plan, choose_regime_kernel, kernelize, kinds_of, plan_of, read_plan, write_plan
from graphprune.models.tiny import random_tokens, tiny_llama


def by_rows(decode_winner: str, prefill_winner: str = "dense", max_rows: int = 8):
    """A fake timer: ``decode_winner`` is fastest on inputs of up to ``max_rows`` rows, ``prefill_winner`` above."""

    def timer(module: KernelLinear, x: torch.Tensor, *, repeats: int, warmup: int) -> float:
        winner = decode_winner if x.shape[0] <= max_rows else prefill_winner
        return 1.0 if module.kind == winner else 3.0

    return timer


def sparse_weight(out: int = 48, inp: int = 40, sparsity: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w * (torch.rand(out, inp, generator=g) >= sparsity)


def test_regimes_that_disagree_give_a_pair_that_dispatches_on_rows() -> None:
    w, b = sparse_weight(), torch.randn(48)
    module, entry = choose_regime_kernel(w, b, candidates=["csr"], timer=by_rows("csr"))
    assert isinstance(module, RegimeLinear)
    assert isinstance(module.decode, CSRLinear) and isinstance(module.prefill, DenseLinear)
    assert entry["decode"] == "csr" and entry["prefill"] == "dense" and entry["max_decode_tokens"] == 8
    assert set(entry["times"]) == {"1", "8", "128"} and entry["speedup"] == {"decode": 3.0, "prefill": 1.0}
    assert entry["confirm"]["decode"]["won_again"]
    used: list[str] = []
    for part in (module.decode, module.prefill):
        part.register_forward_hook(lambda m, args, out: used.append(m.kind))
    for rows, expected in ((1, "csr"), (8, "csr"), (9, "dense"), (128, "dense")):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(module(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        assert used[-1] == expected, rows
    x = torch.randn(2, 3, 40)  # 6 rows as batch x sequence
    torch.testing.assert_close(module(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert used[-1] == "csr"
    torch.testing.assert_close(module.to_linear().weight, w)


def test_regimes_that_agree_give_one_kernel() -> None:
    module, entry = choose_regime_kernel(sparse_weight(), candidates=["csr"], timer=by_rows("csr", "csr"))
    assert isinstance(module, CSRLinear) and entry["decode"] == entry["prefill"] == "csr"
    module, entry = choose_regime_kernel(sparse_weight(), candidates=["csr"], timer=by_rows("dense", "dense"))
    assert isinstance(module, DenseLinear) and entry["speedup"] == {"decode": 1.0, "prefill": 1.0}


def test_a_decode_win_that_does_not_repeat_is_dropped() -> None:
    calls = {"dense": 0}

    def flaky(module: KernelLinear, x: torch.Tensor, *, repeats: int, warmup: int) -> float:
        if module.kind == "dense":
            calls["dense"] += 1
            return 5.0 if calls["dense"] <= 2 else 1.0  # the first measurements (1 and 8 rows) stall
        return 2.0

    module, entry = choose_regime_kernel(sparse_weight(), candidates=["csr"], decode_tokens=(1, 8), prefill_tokens=(), timer=flaky)
    assert isinstance(module, DenseLinear)
    assert entry["decode"] == "dense" and entry["confirm"]["decode"] == {"kind": "csr", "times": {"dense": 2.0, "csr": 4.0}, "won_again": False}


def test_bad_token_counts_are_refused() -> None:
    with pytest.raises(ConfigError, match="below the prefill"):
        choose_regime_kernel(sparse_weight(), decode_tokens=(1, 64), prefill_tokens=(32,), timer=by_rows("dense"))
    with pytest.raises(ConfigError, match="at least one"):
        choose_regime_kernel(sparse_weight(), decode_tokens=(), prefill_tokens=(), timer=by_rows("dense"))


def test_a_trace_records_the_kernel_of_its_example() -> None:
    w = sparse_weight()
    module = RegimeLinear(CSRLinear.from_linear(w), DenseLinear.from_linear(w), 8)
    short = torch.jit.trace(module, torch.randn(4, 40))
    long = torch.jit.trace(module, torch.randn(128, 40))
    x = torch.randn(128, 40)
    for traced in (short, long):
        torch.testing.assert_close(traced(x), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert "aten::linear" not in str(short.inlined_graph)  # the CSR decode kernel, at every length
    assert "aten::linear" in str(long.inlined_graph)


def _pruned_tiny() -> torch.nn.Module:
    model = tiny_llama(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.mul_(torch.rand_like(lin.weight) >= 0.5)
    return model.eval()


def test_kernelize_writes_a_plan_that_reapplies_without_measuring(tmp_path) -> None:
    tokens = random_tokens(seed=1)
    model = _pruned_tiny()
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    plan = kernelize(model, candidates=["csr"], timer=by_rows("csr"), progress=False)
    names = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(plan["linears"]) == sorted(names) and sorted(plan["report"]) == sorted(names)
    assert all(k == {"decode": "csr", "prefill": "dense"} for k in plan["linears"].values())
    assert isinstance(model.model.layers[0].mlp.down_proj, RegimeLinear)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, KernelLinear)  # no zeros: not a candidate
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(input_ids=tokens[:1, :1]).logits, before[:1, :1], atol=1e-5, rtol=1e-5)

    write_plan(tmp_path, plan)
    saved = json.loads((tmp_path / PLAN_FILE).read_text())
    assert "report" not in saved and saved["max_decode_tokens"] == 8
    fresh = _pruned_tiny()
    assert apply_plan(fresh, read_plan(tmp_path)) == len(names)
    assert plan_of(fresh)["linears"] == plan["linears"]
    assert kinds_of(fresh.model.layers[1].mlp.up_proj) == {"decode": "csr", "prefill": "dense"}
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=tokens).logits, before, atol=1e-5, rtol=1e-5)


def test_a_plan_from_another_machine_or_model_is_not_applied(tmp_path) -> None:
    model = _pruned_tiny()
    plan = kernelize(model, candidates=["csr"], timer=by_rows("csr"), progress=False)
    write_plan(tmp_path, plan | {"machine": {"cpu": "elsewhere", "torch": "0", "threads": "1"}})
    assert read_plan(tmp_path) is None
    with pytest.raises(ConfigError, match="does not have"):
        apply_plan(_pruned_tiny(), plan | {"linears": {"model.layers.9.mlp.up_proj": {"decode": "csr", "prefill": "dense"}}})
    with pytest.raises(ConfigError, match="unknown kernel"):
        apply_plan(_pruned_tiny(), plan | {"linears": {"model.layers.0.mlp.up_proj": {"decode": "magic", "prefill": "dense"}}})
    (tmp_path / PLAN_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="delete it"):
        read_plan(tmp_path)


def test_cold_timing_cycles_through_copies_larger_than_the_cache(monkeypatch) -> None:
    from graphprune.kernels import select

    monkeypatch.setattr(select, "last_level_cache_bytes", lambda: 1 << 20)
    kernel = DenseLinear.from_linear(torch.randn(64, 256))  # 64 KiB of weight
    calls: list[int] = []
    original = DenseLinear.forward

    def counting(self: DenseLinear, x: torch.Tensor) -> torch.Tensor:
        calls.append(id(self))
        return original(self, x)

    monkeypatch.setattr(DenseLinear, "forward", counting)
    times = select.cold_runtime(kernel, torch.randn(1, 256), repeats=3, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert len(set(calls)) == 32 and len(calls) == 4 * 32  # 2 MiB / 64 KiB copies, every pass over all of them
    assert select.last_level_cache_bytes() == 1 << 20


def test_decode_counts_are_timed_cold_without_an_injected_timer(monkeypatch) -> None:
    from graphprune.kernels import regime

    seen: list[tuple[str, int]] = []

    def fake_cold(module: KernelLinear, x: torch.Tensor, *, repeats: int, warmup: int) -> list[float]:
        seen.append((module.kind, x.shape[0]))
        return [1.0]

    monkeypatch.setattr(regime, "cold_runtime", fake_cold)
    choose_regime_kernel(sparse_weight(), candidates=["csr"], prefill_tokens=(16,), repeats=1, warmup=0)
    assert {tokens for _, tokens in seen} == {1, 8}  # prefill (16 rows) is timed hot, on one module
    seen.clear()  # a model whose weights fit in the cache decodes from the cache: timed hot
    choose_regime_kernel(sparse_weight(), candidates=["csr"], prefill_tokens=(16,), repeats=1, warmup=0, working_set=1 << 16)
    assert not seen
