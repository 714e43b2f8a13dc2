"""Generation exports (KV cache) and the decoding loop: equal to transformers' own generate,
the files decode like eager PyTorch, layers of different widths, nothing half-written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from graphprune.cli import main
from graphprune.errors import ConfigError, ExportError, OutputError
from graphprune.exporters import generation as generation_module
from graphprune.exporters.generation import export_generation
from graphprune.exporters.kv import CacheLayout, KVCacheLM
from graphprune.exporters.runners import EagerRunner, check_prompts, generate, left_padded, load_runner
from graphprune.models.loader import ByteTokenizer
from graphprune.models.tiny import tiny_llama, tiny_opt


def _hf_greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    out = model.generate(  # type: ignore[operator]
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_eager_loop_equals_transformers_generate(make) -> None:
    """Left-padded batch, KV cache, position ids: the loop every runtime shares gives the
    tokens of transformers' own greedy generate."""
    model = make().eval()
    ids, mask = left_padded([[5, 17, 99, 3, 250, 8, 8, 1], [42, 7, 61]])
    ours = generate(EagerRunner(model), ids, mask, max_new_tokens=12, stop_at_eos=False)
    assert torch.equal(ours.tokens, _hf_greedy(model, ids, mask, 12))
    assert ours.steps == 11 and ours.ttft_s > 0 and ours.tokens_per_s > 0


def test_lm_head_runs_on_the_last_position_only() -> None:
    model = tiny_llama().eval()
    seen: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    layout = CacheLayout.probe(model)
    seen.clear()
    ids, mask = left_padded([[1, 2, 3, 4, 5, 6, 7]])
    logits, *present = KVCacheLM(model, layout)(ids, mask, torch.arange(7)[None], *layout.empty_past(1))
    assert seen == [(1, 1, 64)] and logits.shape == (1, 1, 256)
    assert [tuple(p.shape) for p in present] == [(1, 2, 7, 16)] * 4


def _narrow_mlp(model: nn.Module, layer: int, width: int) -> nn.Module:
    """Physically drop MLP channels of one layer (a model whose layers differ in width)."""
    mlp = model.model.layers[layer].mlp  # type: ignore[union-attr,index]
    keep = torch.arange(width)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, width, bias=False)
        new.weight.data = old.weight.data[keep].clone()
        setattr(mlp, name, new)
    old = mlp.down_proj
    new = nn.Linear(width, old.out_features, bias=False)
    new.weight.data = old.weight.data[:, keep].clone()
    mlp.down_proj = new
    return model


def _two_four(model: nn.Module) -> nn.Module:
    """Zero 2 of every 4 weights of every block Linear (smallest magnitudes)."""
    for layer in model.model.layers:  # type: ignore[union-attr]
        for lin in [m for m in layer.modules() if isinstance(m, nn.Linear)]:
            w = lin.weight.data.view(lin.out_features, -1, 4)
            drop = w.abs().argsort(dim=-1)[..., :2]
            w.scatter_(-1, drop, 0.0)
    return model


MODELS = {
    "dense": lambda: tiny_llama(),
    "2:4": lambda: _two_four(tiny_llama(seed=1)),
    "narrow-mlp": lambda: _narrow_mlp(tiny_llama(seed=2), 0, 96),
    "opt": lambda: tiny_opt(),
}


# TorchScript traces in a second, every model; an ONNX (dynamo) export takes ~10 s, so ONNX runs
# the two models that differ most from the dense LLaMA (the 2:4 one is also in tests/bench)
CASES = [(kind, "torchscript") for kind in sorted(MODELS)] + [("narrow-mlp", "onnx"), ("opt", "onnx")]


@pytest.mark.parametrize(("kind", "fmt"), CASES)
def test_generation_file_decodes_like_eager(kind, fmt, tmp_path) -> None:
    model = MODELS[kind]().eval()
    rep = export_generation(model, tmp_path / "gen", format=fmt, tokenizer=ByteTokenizer(), check_tokens=16)
    assert rep.tokens_equal and rep.max_abs_diff is not None and rep.max_abs_diff < 1e-4
    names = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert names == sorted(["generation.json", "tokenizer_kind.txt", "model.onnx" if fmt == "onnx" else "model.pt"])
    desc = json.loads((tmp_path / "gen" / "generation.json").read_text())
    assert desc["format"] == fmt and len(desc["layout"]["keys"]) == 2
    # new shapes (batch 3, other prompt lengths), then a continuation with a non-empty cache
    runner, eager = load_runner(tmp_path / "gen"), EagerRunner(model)
    ids, mask = left_padded([[9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [200]])
    got = generate(runner, ids, mask, max_new_tokens=10, stop_at_eos=False, keep_logits=True)
    ref = generate(eager, ids, mask, max_new_tokens=10, stop_at_eos=False, keep_logits=True)
    assert torch.equal(got.tokens, ref.tokens)
    assert got.logits is not None and ref.logits is not None
    assert float((got.logits - ref.logits).abs().max()) < 1e-4


def _narrow_attention(model: nn.Module, layer: int) -> nn.Module:
    """Physically drop heads of one layer: 2 of 4 query heads and 1 of 2 KV heads (one group)."""
    attn = model.model.layers[layer].self_attn  # type: ignore[union-attr,index]
    dim = attn.head_dim
    for name, keep in (("q_proj", 2 * dim), ("k_proj", dim), ("v_proj", dim)):
        old = getattr(attn, name)
        new = nn.Linear(old.in_features, keep, bias=False)
        new.weight.data = old.weight.data[:keep].clone()
        setattr(attn, name, new)
    old = attn.o_proj
    attn.o_proj = nn.Linear(2 * dim, old.out_features, bias=False)
    attn.o_proj.weight.data = old.weight.data[:, : 2 * dim].clone()
    return model


def test_cached_attention_is_fused_into_one_operator(tmp_path) -> None:
    """Each layer's attention becomes one ``Attention`` fed the past keys/values and 3-D q/k/v,
    with the layer's own head counts (here 4/2 and 2/1); no step repeats the cache for the
    grouped-query heads, and the file decodes exactly like eager PyTorch."""
    import onnx

    model = _narrow_attention(tiny_llama(seed=3), 1).eval()
    rep = export_generation(model, tmp_path / "gen", format="onnx", tokenizer=ByteTokenizer(), check_tokens=16)
    assert rep.tokens_equal and rep.max_abs_diff is not None and rep.max_abs_diff < 1e-4
    graph = onnx.load(str(tmp_path / "gen" / "model.onnx")).graph
    attention = [n for n in graph.node if n.op_type == "Attention"]
    heads = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in attention]
    assert [(h["q_num_heads"], h["kv_num_heads"]) for h in heads] == [(4, 2), (2, 1)]
    for i, node in enumerate(attention):
        assert list(node.input[4:]) == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert list(node.output[1:]) == [f"present.{i}.key", f"present.{i}.value"]
    ops = {n.op_type for n in graph.node}
    assert "Expand" not in {n.op_type for n in graph.node if any(i.startswith("present.") for i in n.input)}
    assert "Concat" not in {n.op_type for n in graph.node if any(o.startswith("present.") for o in n.output)}
    assert "RotaryEmbedding" in ops
    runner, eager = load_runner(tmp_path / "gen"), EagerRunner(model)
    ids, mask = left_padded([[9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [200]])
    got = generate(runner, ids, mask, max_new_tokens=10, stop_at_eos=False, keep_logits=True)
    ref = generate(eager, ids, mask, max_new_tokens=10, stop_at_eos=False, keep_logits=True)
    assert torch.equal(got.tokens, ref.tokens)
    assert got.logits is not None and ref.logits is not None
    assert float((got.logits - ref.logits).abs().max()) < 1e-4


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise ExportError("the onnxruntime generation file decodes other tokens than eager PyTorch")

    monkeypatch.setattr(generation_module, "compare_greedy", fail)
    with pytest.raises(ExportError, match="decodes other tokens"):
        export_generation(tiny_llama().eval(), tmp_path / "out" / "gen", format="torchscript")
    assert not (tmp_path / "out").exists()


def test_refusals(tmp_path) -> None:
    with pytest.raises(ExportError, match="not a Hugging Face causal LM"):
        export_generation(nn.Linear(4, 4), tmp_path / "a", format="onnx")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        export_generation(tiny_llama().eval(), tmp_path / "b", format="torchscript", check_tokens=0)
    assert (tmp_path / "b" / "keep.txt").read_text() == "x"


def test_sampling_is_seeded_and_top1_is_greedy() -> None:
    runner = EagerRunner(tiny_llama().eval())
    ids, mask = check_prompts(256)
    greedy = generate(runner, ids, mask, max_new_tokens=8, stop_at_eos=False).tokens
    top1 = generate(runner, ids, mask, max_new_tokens=8, temperature=1.0, top_k=1, stop_at_eos=False).tokens
    a = generate(runner, ids, mask, max_new_tokens=8, temperature=1.5, seed=3, stop_at_eos=False).tokens
    b = generate(runner, ids, mask, max_new_tokens=8, temperature=1.5, seed=3, stop_at_eos=False).tokens
    assert torch.equal(greedy, top1) and torch.equal(a, b) and not torch.equal(a, greedy)


def test_generation_stops_at_end_of_text() -> None:
    model = tiny_llama().eval()
    runner = EagerRunner(model)
    ids, mask = check_prompts(256)
    free = generate(runner, ids, mask, max_new_tokens=6, stop_at_eos=False).tokens
    first = sorted(set(free[:, 2].tolist()))  # every row emits its "end" at step 2 at the latest
    runner.layout = CacheLayout(runner.layout.keys, runner.layout.values, 256, tuple(first))
    stopped = generate(runner, ids, mask, max_new_tokens=6).tokens
    assert stopped.shape[1] <= 3
    for row in stopped.tolist():  # after its end-of-text id a row repeats it
        end = next(i for i, t in enumerate(row) if t in first)
        assert all(t == row[end] for t in row[end:])


def test_cli_export_and_generate(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gen"
    assert main(["export", "tiny-llama", "--format", "torchscript", "--for", "generation", "--out", str(out), "-q"]) == 0
    assert "16 greedy tokens" not in capsys.readouterr().out  # the default checks 32
    assert main(["generate", "--model", str(out), "--prompt", "ab", "--prompt", "hello", "--max-new-tokens", "5", "-q", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["runtime"] == "torchscript" and res["new_tokens"] == 5 and len(res["texts"]) == 2
    assert main(["generate", "--model", "tiny-llama", "--prompt", "ab", "--prompt", "hello", "--max-new-tokens", "5", "-q", "--json"]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert eager["texts"] == res["texts"]  # same greedy text from the file and from eager PyTorch
    for args, message in [
        (["generate", "--model", str(out), "--prompt", "x", "--runtime", "onnxruntime"], "runs in torchscript"),
        (["generate", "--model", "tiny-llama", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["export", "tiny-llama", "--format", "torchscript", "--for", "generation", "--quantize", "int8", "--out", str(tmp_path / "x")], "--format onnx"),
    ]:
        assert main([*args, "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_the_shipped_file_is_evaluated(tmp_path: Path, capsys) -> None:
    """`graphprune eval` on the exported ONNX and TorchScript files gives the model's own perplexity."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and {i * 7 % 13} more" for i in range(1500)))
    ppl = {}
    for spec in ["tiny-llama", str(tmp_path / "m.onnx"), str(tmp_path / "m.pt")]:
        if spec != "tiny-llama":
            fmt = "onnx" if spec.endswith(".onnx") else "torchscript"
            assert main(["export", "tiny-llama", "--format", fmt, "--out", spec, "-q"]) == 0
            capsys.readouterr()
        extra = [] if spec == "tiny-llama" else ["--tokenizer", "tiny-llama"]
        assert main(["eval", "--model", spec, *extra, "--text", str(text), "--eval-len", "64", "-q", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        ppl[spec] = res["ppl"]
        assert res["tokens"] > 2000
    values = list(ppl.values())
    assert max(values) / min(values) - 1 < 1e-4, ppl
    # the export wrote the tokenizer beside the file; a file moved away from it and no
    # --tokenizer: one line naming the fix
    bare = tmp_path / "bare"
    bare.mkdir()
    (tmp_path / "m.onnx").rename(bare / "m.onnx")
    assert main(["eval", "--model", str(bare / "m.onnx"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenizer" in err[0]


def test_onnxruntime_genai_folder_runs_through_the_same_loop(tmp_path: Path) -> None:
    """A folder described by a genai_config.json (onnxruntime-genai's format) instead of
    generation.json decodes the same tokens through graphprune's runner."""
    model = tiny_llama().eval()
    export_generation(model, tmp_path / "ours", check_tokens=0)
    peer = tmp_path / "peer"
    peer.mkdir()
    (tmp_path / "ours" / "model.onnx").rename(peer / "decoder.onnx")
    cfg = model.config
    (peer / "genai_config.json").write_text(json.dumps({"model": {
        "type": "llama", "vocab_size": cfg.vocab_size, "eos_token_id": [2],
        "decoder": {"filename": "decoder.onnx", "num_hidden_layers": cfg.num_hidden_layers,
                    "num_key_value_heads": cfg.num_key_value_heads, "head_size": cfg.hidden_size // cfg.num_attention_heads,
                    "inputs": {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}},
    }}))
    runner = load_runner(peer)
    assert runner.layout.eos_token_ids == (2,) and runner.layout.layers == cfg.num_hidden_layers
    ids, mask = check_prompts(cfg.vocab_size)
    got = generate(runner, ids, mask, max_new_tokens=6, stop_at_eos=False)
    want = generate(EagerRunner(model), ids, mask, max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(got.tokens, want.tokens)
    bad = json.loads((peer / "genai_config.json").read_text())
    bad["model"]["decoder"]["inputs"]["past_key_names"] = "past.%d.k"
    (peer / "genai_config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="cache tensors"):
        load_runner(peer)


def test_eval_of_a_generation_folder_equals_the_model(tmp_path: Path, capsys) -> None:
    """`graphprune eval --model GENERATION_FOLDER` scores every window token by token through
    the file's KV cache and gives the model's own perplexity."""
    from graphprune.data import default_text

    text = tmp_path / "t.txt"
    text.write_text(default_text()[:6000])
    out = tmp_path / "gen"
    assert main(["export", "tiny-llama", "--format", "onnx", "--for", "generation", "--check-tokens", "0", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    common = ["--text", str(text), "--eval-len", "32", "--json", "-q"]
    assert main(["eval", "--model", "tiny-llama", *common]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(out), *common]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == want["tokens"] and "KV cache" in got["runtime"]
    assert abs(got["ppl"] - want["ppl"]) <= 1e-4 * want["ppl"]
