"""The torch.compile decode runtime with graphprune's native kernels, and kernel files in a fresh process."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from graphprune.exporters.runners import CompiledRunner, EagerRunner, check_prompts, generate
from graphprune.kernels import PackedLinear, packed_available, packed_unavailable_reason
from graphprune.kernels.dense import DenseLinear
from graphprune.kernels.regime import RegimeLinear
from graphprune.models.tiny import tiny_llama

needs_native = pytest.mark.skipif(
    not packed_available(), reason=f"the native packed kernel is unavailable here: {packed_unavailable_reason()}"
)


def _packed_tiny() -> torch.nn.Module:
    """A tiny LLaMA whose MLP Linears are half zeros and run on packed (decode) / dense (prefill) kernels."""
    model = tiny_llama(seed=4).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(layer.mlp, name)
                w = lin.weight * (torch.rand_like(lin.weight) >= 0.5)
                setattr(layer.mlp, name, RegimeLinear(PackedLinear(w), DenseLinear.from_linear(w), 8))
    return model


@needs_native
def test_compiled_decode_matches_eager_with_packed_kernels() -> None:
    torch._dynamo.reset()
    model = _packed_tiny()
    ids, mask = check_prompts(model.config.vocab_size, lengths=(9, 5))
    eager = generate(EagerRunner(model), ids, mask, max_new_tokens=6, stop_at_eos=False, keep_logits=True)
    runner = CompiledRunner(model)
    compiled = generate(runner, ids, mask, max_new_tokens=6, stop_at_eos=False, keep_logits=True)
    assert torch.equal(compiled.tokens, eager.tokens)
    scale = eager.logits.abs().max()
    assert ((compiled.logits - eager.logits).abs().max() / scale).item() <= 1e-5


def test_compiled_runtime_refuses_forward_cases() -> None:
    from graphprune.bench import BenchTarget, bench_latency
    from graphprune.bench.latency import Case
    from graphprune.errors import ConfigError

    with pytest.raises(ConfigError, match="ttft and decode cases only"):
        bench_latency([BenchTarget("m", model=tiny_llama())], runtimes=["compile"], cases=[Case("prefill", 1, 8)])


@needs_native
def test_a_traced_kernel_file_loads_in_a_fresh_process(tmp_path) -> None:
    torch.manual_seed(0)
    w = torch.randn(40, 70) * (torch.rand(40, 70) >= 0.5)
    kernel = PackedLinear(w, torch.randn(40))
    x = torch.randn(3, 70)
    traced = torch.jit.trace(kernel, x)
    path = tmp_path / "kernel.pt"
    traced.save(str(path))
    torch.save({"x": x, "y": kernel(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from graphprune.exporters.runners import load_torchscript
        module = load_torchscript({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        assert torch.equal(module(io["x"]), io["y"]), "outputs differ"
        assert "graphprune::packed_linear" in str(module.inlined_graph)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
