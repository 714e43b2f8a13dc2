"""The native packed kernel computes F.linear (any shape, sparsity, token count), traces and
exports, and its absence is reported instead of raised."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.kernels.base import KernelLinear, KernelUnavailableError
from graphprune.kernels.packed import PackedLinear, pack_weight, packed_available, packed_unavailable_reason, unpack_weight

REPO = Path(__file__).resolve().parents[2]
TOL = {"rtol": 1e-5, "atol": 1e-5}

native = pytest.mark.skipif(not packed_available(), reason=f"native packed kernel not built on this machine: {packed_unavailable_reason()}")


def _weight(out: int, inp: int, pattern: str, seed: int = 0) -> torch.Tensor:
    """A weight scaled so outputs are O(1) (the tolerances are then absolute and relative)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) / inp**0.5
    if pattern == "2:4":
        groups = w.reshape(out, -1, 4)
        groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
    elif pattern.endswith("%"):
        w[torch.rand(out, inp, generator=gen) < float(pattern[:-1]) / 100] = 0.0
    elif pattern == "rows":  # all-zero rows, fully dense rows and a random mix
        w[::3] = 0.0
        w[2::3][torch.rand(w[2::3].shape, generator=gen) < 0.7] = 0.0
    return w


def _x(*shape: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SHAPES = [(1, 37), (7, 100), (64, 576), (7, 16), (64, 33), (1, 1)]
PATTERNS = ["0%", "50%", "90%", "100%", "rows"]


def test_pack_roundtrip_and_layout() -> None:
    w = _weight(7, 70, "50%")
    mask, offsets, values = pack_weight(w)
    assert mask.dtype == torch.int32 and tuple(mask.shape) == (7, 3)
    assert offsets.dtype == torch.int64 and tuple(offsets.shape) == (8,)
    assert int(offsets[-1]) == values.numel() == int((w != 0).sum())
    assert torch.equal(unpack_weight(mask, values, 70), w)
    # bit b of word k is column 32*k + b, sign bit included
    w = torch.zeros(1, 64)
    w[0, 31] = w[0, 32] = 1.0
    mask, _, _ = pack_weight(w)
    assert mask.tolist() == [[-(2**31), 1]]


@native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_f_linear(shape: tuple[int, int], pattern: str, with_bias: bool) -> None:
    out, inp = shape
    w = _weight(out, inp, pattern)
    b = _x(out, seed=1) if with_bias else None
    module = PackedLinear.from_linear(w, b)
    assert isinstance(module, KernelLinear) and module.kind == "packed"
    assert not any(True for _ in module.parameters())  # buffers only
    for tokens in range(1, 9):
        x = _x(tokens, inp, seed=tokens)
        torch.testing.assert_close(module(x), F.linear(x, w, b), **TOL)
    torch.testing.assert_close(module.dense_weight(), w, atol=0, rtol=0)


@native
@pytest.mark.parametrize("shape", [(64, 576), (576, 1536), (7, 100)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("with_bias", [True, False])
def test_two_four_and_3d_inputs(shape: tuple[int, int], with_bias: bool) -> None:
    out, inp = shape
    w = _weight(out, inp, "2:4")
    b = _x(out, seed=1) if with_bias else None
    module = PackedLinear.from_linear(w, b)
    for lead in [(1,), (8,), (2, 3), (1, 1, 5)]:
        x = _x(*lead, inp)
        y = module(x)
        assert y.shape == (*lead, out)
        torch.testing.assert_close(y, F.linear(x, w, b), **TOL)


@native
@pytest.mark.parametrize("tokens", [9, 17, 64])
def test_more_than_eight_tokens(tokens: int) -> None:
    w, b = _weight(48, 100, "50%"), _x(48, seed=1)
    x = _x(tokens, 100)
    torch.testing.assert_close(PackedLinear.from_linear(w, b)(x), F.linear(x, w, b), **TOL)


@native
def test_non_contiguous_input_and_empty_batch() -> None:
    w = _weight(16, 40, "50%")
    module = PackedLinear.from_linear(w)
    x = _x(40, 3).t()  # [3, 40], not contiguous
    torch.testing.assert_close(module(x), F.linear(x, w), **TOL)
    assert module(torch.empty(0, 40)).shape == (0, 16)


@native
def test_rejects_what_it_cannot_run() -> None:
    w = _weight(8, 32, "50%")
    assert PackedLinear.unavailable_reason(w, device=torch.device("cpu"), dtype=torch.float32) is None
    assert "float32" in str(PackedLinear.unavailable_reason(w, device=torch.device("cpu"), dtype=torch.float64))
    assert "CPU" in str(PackedLinear.unavailable_reason(w, device=torch.device("cuda"), dtype=torch.float32))
    with pytest.raises(KernelUnavailableError):
        PackedLinear.from_linear(w.double())
    module = PackedLinear.from_linear(w)
    with pytest.raises(Exception, match="expects inputs"):
        module(torch.randn(2, 31))
    with pytest.raises(RuntimeError, match="float32"):
        module(torch.randn(2, 32, dtype=torch.float64))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = PackedLinear.from_linear(_weight(64, 37, "50%"), _x(64, seed=1))
        self.down = PackedLinear.from_linear(_weight(37, 64, "2:4", seed=3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _reference(block: _Block, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(F.linear(x, block.up.dense_weight(), block.up.bias))
    return F.linear(h, block.down.dense_weight())


@native
def test_torch_export() -> None:
    block = _Block().eval()
    x = _x(2, 3, 37)
    exported = torch.export.export(block, (x,))
    assert any("packed_linear" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), block(x), atol=0, rtol=0)
    torch.testing.assert_close(block(x), _reference(block, x), **TOL)


@native
def test_torch_compile_traces_the_op() -> None:
    block = _Block().eval()
    x = _x(4, 37)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), atol=0, rtol=0)


@native
def test_torchscript_trace_save_load(tmp_path: Path) -> None:
    block = _Block().eval()
    x = _x(1, 37)
    traced = torch.jit.trace(block, (x,))
    path = tmp_path / "block.pt"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    for tokens in (1, 8):
        xt = _x(tokens, 37, seed=tokens)
        torch.testing.assert_close(loaded(xt), block(xt), atol=0, rtol=0)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_native_env_reports_unavailable() -> None:
    code = """
        import torch
        from graphprune.kernels.packed import PackedLinear, packed_available, packed_unavailable_reason
        assert packed_available() is False
        reason = packed_unavailable_reason()
        assert reason and "GRAPHPRUNE_NO_NATIVE" in reason, reason
        w = torch.ones(4, 8)
        assert PackedLinear.unavailable_reason(w, device=torch.device("cpu"), dtype=torch.float32) == reason
        try:
            PackedLinear.from_linear(w)
        except Exception as exc:
            assert type(exc).__name__ == "KernelUnavailableError", exc
        else:
            raise AssertionError("built without the native kernel")
        assert packed_available() is False  # asked again: same answer, no second warning
        print("REASON", reason)
    """
    done = _run(code, {"GRAPHPRUNE_NO_NATIVE": "1"})
    assert done.returncode == 0, done.stderr
    assert "REASON GRAPHPRUNE_NO_NATIVE is set" in done.stdout
    assert done.stderr.count("runs packed sparse layers dense") == 1, done.stderr


def test_failed_build_reports_unavailable(tmp_path: Path) -> None:
    """A missing compiler: one warning naming the cause, no exception, layers stay dense."""
    code = """
        from graphprune.kernels.packed import packed_available, packed_unavailable_reason
        assert packed_available() is False and packed_available() is False
        print("REASON", packed_unavailable_reason())
    """
    done = _run(code, {"CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert "REASON building the native kernel failed" in done.stdout and "no-such-compiler" in done.stdout, done.stdout
    assert done.stderr.count("runs packed sparse layers dense") == 1, done.stderr


def _cpu_has(flag: str) -> bool:
    try:
        return f" {flag} " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


@pytest.mark.slow
@native
@pytest.mark.parametrize(
    ("isa", "flags"),
    [
        pytest.param("avx2", ["-O2", "-mavx2", "-mfma", "-mno-avx512f"], marks=pytest.mark.skipif(not _cpu_has("avx2"), reason="the CPU has no AVX2")),
        ("scalar", ["-O2", "-mno-avx2", "-mno-avx512f"]),
    ],
)
def test_other_vector_paths_build(tmp_path: Path, isa: str, flags: list[str]) -> None:
    """The AVX2 and the portable paths, each built separately in a fresh process (~20 s each)."""
    code = f"""
        import torch, torch.nn.functional as F
        from torch.utils import cpp_extension
        from graphprune.kernels.packed import SOURCE, pack_weight
        cpp_extension.load(name="graphprune_packed_{isa}", sources=[str(SOURCE)], is_python_module=False,
                           extra_cflags={flags + ["-fopenmp"]!r}, extra_ldflags=["-fopenmp"],
                           build_directory={str(tmp_path)!r})
        assert torch.ops.graphprune.packed_isa() == {isa!r}, torch.ops.graphprune.packed_isa()
        gen = torch.Generator().manual_seed(0)
        for out, inp in [(7, 37), (64, 100), (5, 576)]:
            for p in (0.0, 0.5, 1.0):
                w = torch.randn(out, inp, generator=gen) / inp ** 0.5
                w[torch.rand(out, inp, generator=gen) < p] = 0
                b = torch.randn(out, generator=gen)
                for tokens in (1, 3, 8, 11):
                    x = torch.randn(2, tokens, inp, generator=gen)
                    y = torch.ops.graphprune.packed_linear(x, *pack_weight(w), b, out)
                    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        print("OK")
    """
    done = _run(code, {})
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
