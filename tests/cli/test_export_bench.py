"""``graphprune export`` and ``graphprune bench`` end to end on a tiny pruned folder (structure and parity, never timings)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

from graphprune.cli import main
from graphprune.data import default_text
from graphprune.models.tiny import random_tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tiny-llama pruned to 50 % by magnitude, written by ``graphprune prune``."""
    tmp = tmp_path_factory.mktemp("export_bench")
    text = tmp / "text.txt"
    text.write_text(default_text()[:12000])
    out = tmp / "tiny-50"
    args = ["prune", "--model", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--text", str(text),
            "--calib-samples", "2", "--calib-len", "32", "--out", str(out), "-q"]
    assert main(args) == 0
    return str(out)


def reference_logits(folder: str, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_export_onnx_with_sparse_initializers(folder, tmp_path, capsys) -> None:
    out = tmp_path / "model.onnx"
    assert main(["export", folder, "--format", "onnx", "--out", str(out), "--sparse-initializers", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["format"] == "onnx" and res["path"] == str(out) and out.is_file()
    assert res["bytes"] == out.stat().st_size and res["bytes"] < res["dense_bytes"]
    assert res["packed_initializers"] + res["sparse_initializers"] > 0
    assert res["sparsity"] == pytest.approx(0.5, abs=1e-3) and res["max_abs_diff"] <= 1e-4
    # independent parity check: onnxruntime on the written file vs transformers on the folder
    ids = random_tokens(1, 11, seed=3)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, reference_logits(folder, ids).numpy(), atol=1e-4, rtol=0)


def test_export_torchscript_and_overwrite(folder, tmp_path, capsys) -> None:
    out = tmp_path / "model.pt"
    out.write_text("old")
    assert main(["export", folder, "--format", "torchscript", "--out", str(out), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "old"
    assert main(["export", folder, "--format", "torchscript", "--out", str(out), "--overwrite", "-q"]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "torchscript" in line and "fresh process" in line
    module = torch.jit.load(str(out))
    ids = random_tokens(2, 9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(module(ids), reference_logits(folder, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "/no/such/folder", "--format", "onnx", "--out", "OUT/m.onnx"], "not found"),
        (["export", "tiny-llama", "--format", "torchscript", "--out", "OUT/m.pt", "--sparse-initializers"], "--format onnx only"),
        (["export", "tiny-llama", "--format", "onnx", "--out", "OUT"], "is a folder"),
        (["bench", "tiny-llama", "/no/such/folder", "--out", "OUT"], "not found"),
        (["bench", "tiny-llama", "--cases", "prefil", "--out", "OUT"], "unknown case 'prefil'"),
        (["bench", "tiny-llama", "--runtimes", "tensorrt", "--out", "OUT"], "unknown runtime"),
        (["bench", "tiny-llama", "--repeats", "0", "--out", "OUT"], "--repeats must be >= 1"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path, capsys) -> None:
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    assert main(args + ["-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_writes_table_plot_and_json(folder, tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    args = ["bench", "tiny-llama", folder, "--runtimes", "eager", "torchscript", "--cases", "step", "tiny=2x8",
            "--repeats", "2", "--warmup", "0", "--out", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| tiny-llama (baseline) | tiny-50 |" in printed and "wrote" in printed

    data = json.loads((out / "latency.json").read_text())
    assert data["baseline"] == "tiny-llama" and data["repeats"] == 2
    assert [t["name"] for t in data["targets"]] == ["tiny-llama", "tiny-50"]
    assert data["targets"][0]["sparsity"] == 0 and data["targets"][1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert {"cpu", "usable_cores", "torch", "onnxruntime", "load_average"} <= set(data["machine"])
    keys = {(r["case"], r["runtime"], r["target"]) for r in data["records"]}
    assert keys == {(c, rt, t) for c in ("step-nocache", "tiny") for rt in ("eager", "torchscript") for t in ("tiny-llama", "tiny-50")}
    assert all(len(r["times_s"]) == 2 and r["median_s"] > 0 for r in data["records"])
    assert all(r["speedup"] == 1.0 for r in data["records"] if r["target"] == "tiny-llama")
    assert {(r["batch"], r["seq"]) for r in data["records"] if r["case"] == "tiny"} == {(2, 8)}

    md = (out / "latency.md").read_text()
    assert "| tiny 2x8 | torchscript | 1.00x |" in md and "Machine:" in md and "Load average" in md
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_tokenizer_is_written_next_to_a_logits_export(tmp_path, capsys) -> None:
    """`eval --model FILE` then needs no --tokenizer; a folder holding another tokenizer is refused."""
    out = tmp_path / "files"
    assert main(["export", "tiny-llama", "--format", "onnx", "--out", str(out / "m.onnx"), "-q", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokenizer"] and all((out / name).is_file() for name in res["tokenizer"])
    assert main(["eval", "--model", str(out / "m.onnx"), "--eval-len", "64", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1
    # a second export into the same folder with the same tokenizer is fine
    assert main(["export", "tiny-llama", "--format", "torchscript", "--out", str(out / "m.pt"), "-q"]) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    other.mkdir()
    (other / res["tokenizer"][0]).write_text("another tokenizer\n")
    assert main(["export", "tiny-llama", "--format", "onnx", "--out", str(other / "m.onnx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "already holds another tokenizer" in err and not (other / "m.onnx").exists()
