"""The CLI: inspect, eval and prune end to end on tiny models; user errors without tracebacks."""
from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from graphprune.cli import main
from graphprune.data import default_text


@pytest.fixture
def text_file(tmp_path):
    """A small text so the tiny byte-level models calibrate and evaluate quickly."""
    path = tmp_path / "text.txt"
    path.write_text(default_text()[:12000])
    return str(path)


def test_inspect_json(capsys) -> None:
    assert main(["inspect", "--model", "tiny-llama", "--json", "-q"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["linears"] == 15 and len(s["blocks"]) == 2 and s["lm_head"] == "lm_head"
    assert any(sorted(g["linears"])[0].endswith("k_proj") and len(g["linears"]) == 3 for g in s["linear_groups"])


def test_eval_json(capsys, text_file) -> None:
    assert main(["eval", "--model", "tiny-opt", "--text", text_file, "--eval-len", "256", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"ppl", "tokens", "seconds"} <= set(res) and res["ppl"] > 1 and res["tokens"] > 0


def test_eval_windows_scores_a_prefix_of_each_split(capsys, text_file) -> None:
    from graphprune.data import TextSplits, load_texts
    from graphprune.eval import perplexity
    from graphprune.models import load_model

    assert main(["eval", "--model", "tiny-opt", "--text", text_file, "--eval-len", "128", "--eval-windows", "2", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    (name, part), = res["texts"].items()
    assert part["windows"] == 2 and part["windows_total"] > 2 and part["tokens"] == 2 * 127
    loaded = load_model("tiny-opt")
    windows = TextSplits.from_texts(loaded.tokenizer, load_texts([text_file])).eval_windows(128)[name]
    direct = perplexity(lambda ids: loaded.model(input_ids=ids, use_cache=False).logits, windows[:2])
    assert part["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    assert main(["eval", "--model", "tiny-opt", "--text", text_file, "--eval-len", "128", "-q"]) == 0
    assert "not the protocol figure" not in capsys.readouterr().out  # every window: the protocol figure, no caveat


def test_prune_writes_a_loadable_folder(tmp_path, capsys, text_file) -> None:
    out = tmp_path / "pruned"
    args = ["prune", "--model", "tiny-llama", "--method", "sparsegpt", "--pattern", "2:4", "--text", text_file, "--calib-samples", "8",
            "--calib-len", "64", "--eval", "--eval-len", "256", "--out", str(out), "-q"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert {"layers", "stages", "total_seconds", "peak_rss_mb", "ppl"} <= set(report)
    assert all({"sparsity", "rel_error", "seconds"} <= set(e) for e in report["layers"])
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].mlp.down_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    # the pruned folder evaluates to the perplexity the prune run reported
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--text", text_file, "--eval-len", "256", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(report["ppl"], rel=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--model", "tiny-llama", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["prune", "--model", "tiny-llama", "--pattern", "4:2"], "invalid N:M pattern 4:2"),
        (["prune", "--model", "tiny-llama", "--pattern", "2:3"], "multiple of 3"),
        (["prune", "--model", "tiny-llama", "--method", "nope", "--sparsity", "0.5"], "unknown pruning method 'nope'"),
        (["prune", "--model", "tiny-llama", "--pattern", "blocky"], "unknown sparsity pattern"),
        (["eval", "--model", "/no/such/model"], "not found"),
        (["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--calib-len", "100000"], "exceeds tiny-llama's context of 1024"),
        (["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--text", "SHORT"], "fewer than one segment"),
        (["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--eval", "--eval-windows", "0"], "--eval-windows takes a positive number"),
        (["eval", "--model", "tiny-llama", "--eval-windows", "-1"], "--eval-windows takes a positive number"),
    ],
)
def test_user_errors_are_one_line(args, message, capsys, tmp_path) -> None:
    (tmp_path / "short.txt").write_text("too short for a 512-token segment")
    args = [str(tmp_path / "short.txt") if a == "SHORT" else a for a in args]
    assert main(args + ["--out", str(tmp_path / "o"), "-q"] if args[0] == "prune" else args + ["-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_existing_output_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--out", str(out), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
