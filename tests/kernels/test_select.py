"""select_kernel's decision logic, driven by an injected fake timer (no timed assertions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphprune.errors import ConfigError
from graphprune.kernels import BSRLinear, CSRLinear, DenseLinear, KernelLinear, select_kernel

OUT, IN = 64, 128


def _sparse_weight(frac: float = 0.5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=gen) * 0.1
    w[torch.rand(OUT, IN, generator=gen) < frac] = 0.0
    return w


def _block_weight(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(OUT // 16, IN // 16, generator=gen) < 0.25
    return torch.randn(OUT, IN, generator=gen) * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)


def fake_timer(seconds: dict[str, float], calls: list | None = None):
    def timer(module: KernelLinear, x: torch.Tensor, *, repeats: int, warmup: int) -> list[float]:
        if calls is not None:
            calls.append((module.kind, tuple(x.shape), repeats, warmup))
        base = seconds.get(module.kind, 10.0)  # kernels a test does not name lose
        return [base * 1.1, base, base * 0.9]  # median is `base`

    return timer


def test_picks_the_fastest_measured_kernel() -> None:
    calls: list = []
    w, b = _sparse_weight(0.9), torch.randn(OUT)
    module, report = select_kernel(
        w, b, tokens=32, timer=fake_timer({"dense": 3.0, "csr": 1.0}, calls), repeats=7, warmup=2
    )
    assert isinstance(module, CSRLinear) and report.choice == "csr"
    assert report.times["dense"] == 3.0 and report.times["csr"] == 1.0 and report.times.get("packed", 10.0) == 10.0
    assert report.speedup == pytest.approx(3.0)
    assert ("csr", (32, IN), 7, 2) in calls  # measured on the real shape
    x = torch.randn(2, 5, IN)
    torch.testing.assert_close(module(x), F.linear(x, w, b), atol=1e-5, rtol=0)


def test_keeps_dense_when_sparse_is_slower() -> None:
    module, report = select_kernel(_sparse_weight(0.5), tokens=16, timer=fake_timer({"dense": 1.0, "csr": 2.0}))
    assert isinstance(module, DenseLinear) and report.choice == "dense"
    assert report.speedup == 1.0


def test_keeps_dense_when_sparse_gain_is_below_min_speedup() -> None:
    _, report = select_kernel(
        _sparse_weight(), tokens=16, timer=fake_timer({"dense": 1.0, "csr": 0.97}), min_speedup=1.05
    )
    assert report.choice == "dense"
    _, report = select_kernel(
        _sparse_weight(), tokens=16, timer=fake_timer({"dense": 1.0, "csr": 0.97}), min_speedup=1.0
    )
    assert report.choice == "csr"


def test_bsr_only_offered_for_block_sparse_weights() -> None:
    times = {"dense": 3.0, "csr": 2.0, "bsr": 1.0}
    module, report = select_kernel(_block_weight(), tokens=8, timer=fake_timer(times))
    assert isinstance(module, BSRLinear) and report.choice == "bsr"
    _, report = select_kernel(_sparse_weight(0.5), tokens=8, timer=fake_timer(times))
    assert "bsr" not in report.times and "all-zero blocks" in report.skipped["bsr"]
    assert report.choice == "csr"


def test_unavailable_kernels_are_reported_with_reasons() -> None:
    _, report = select_kernel(_sparse_weight(), tokens=4, timer=fake_timer({"dense": 1.0, "csr": 2.0}))
    assert set(report.skipped) >= {"semi_structured", "bsr"}
    assert report.sparsity == pytest.approx(0.5, abs=0.05)
    assert report.to_dict()["choice"] == "dense"


def test_candidates_restrict_the_search_and_dense_is_always_measured() -> None:
    _, report = select_kernel(
        _sparse_weight(), tokens=4, candidates=["csr"], timer=fake_timer({"dense": 1.0, "csr": 0.5})
    )
    assert set(report.times) == {"dense", "csr"} and report.choice == "csr"
    with pytest.raises(ConfigError, match="unknown kernel"):
        select_kernel(_sparse_weight(), tokens=4, candidates=["nope"])


def test_wrong_kernels_are_rejected() -> None:
    class Broken(CSRLinear):
        kind = "broken"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1.0

    _, report = select_kernel(
        _sparse_weight(), tokens=4, candidates=[Broken], timer=fake_timer({"dense": 1.0, "broken": 0.1})
    )
    assert report.choice == "dense" and "wrong output" in report.skipped["broken"]


def test_default_timer_runs() -> None:
    module, report = select_kernel(_sparse_weight(), tokens=8, repeats=2, warmup=1)
    assert report.choice in report.times and all(t > 0 for t in report.times.values())
    assert module.kind == report.choice


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="tokens >= 1"):
        select_kernel(_sparse_weight(), tokens=0)
