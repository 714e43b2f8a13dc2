"""User errors beyond tests/cli/test_cli.py: missing calibration data, non-finite weights and
statistics, unsafe model folders, a model that cannot be captured. Each is one line from the
CLI (exit status 2, no traceback) or a specific error from the library."""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from graphprune.cli import main
from graphprune.errors import CaptureError, ModelLoadError, SolverError
from graphprune.graph.capture import capture
from graphprune.models import load_model
from graphprune.models.tiny import random_tokens, tiny_llama
from graphprune.passes.infra import PassContext, PassManager
from graphprune.passes.prune import PruneConfig, prune_pass
from graphprune.pipeline import EvalJob, PruneJob
from graphprune.solvers import SparsitySpec


def one_line_error(args: list[str], capsys) -> str:
    assert main(args + ["-q"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text", "/no/such/text.txt"], "text file /no/such/text.txt does not exist"),
        (["--calib-samples", "0"], "calibration needs samples >= 1"),
        (["--sparsity", "-0.5"], "sparsity must be in [0, 1), got -0.5"),
        (["--override", "*.q_proj=half"], "override for '*.q_proj' must be a sparsity, an 'N:M' pattern or 'skip', got 'half'"),
    ],
)
def test_calibration_and_sparsity_errors(extra, message, tmp_path, capsys) -> None:
    args = ["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--out", str(tmp_path / "o"), *extra]
    assert message in one_line_error(args, capsys)


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, capsys) -> None:
    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer_kind.txt").write_text("bytes\n")
    err = one_line_error(["prune", "--model", str(tmp_path / "bad"), "--sparsity", "0.5", "--out", str(tmp_path / "o")], capsys)
    assert "model.layers.0.mlp.up_proj.weight has 2 NaN/Inf value(s)" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("tiny_name", ["tiny-llama"])
def test_non_finite_statistics_name_the_observer(tiny_gm) -> None:
    with torch.no_grad():
        tiny_gm.model.get_input_embeddings().weight[:, 0] = float("nan")  # what feeds the first block
    config = PruneConfig("sparsegpt", SparsitySpec(0.5))
    ctx = PassContext(progress=False, verify=False, calibration=random_tokens(2, 8, seed=1))
    with pytest.raises(SolverError, match=r"calibration statistics of model\.layers\.0\.\S+ contain NaN/Inf"):
        PassManager([prune_pass(config)], ctx).run(tiny_gm)


def test_pickled_checkpoints_are_refused(tmp_path, capsys) -> None:
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_llama(layers=1).config.to_dict()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 would be unpickled")
    err = one_line_error(["eval", "--model", str(folder)], capsys)
    assert "has no .safetensors weights; graphprune never unpickles .bin checkpoints" in err
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_model(str(folder))


def test_remote_code_is_off_unless_asked(tmp_path, capsys) -> None:
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert PruneJob().trust_remote_code is False and EvalJob().trust_remote_code is False
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gp-custom", "auto_map": {"AutoConfig": "cfg.C", "AutoModelForCausalLM": "modeling.M"}}))
    for name in ("cfg.py", "modeling.py"):
        (folder / name).write_text("raise SystemExit('remote code ran')\n")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    err = one_line_error(["eval", "--model", str(folder)], capsys)
    assert "needs custom code; pass --trust-remote-code if you trust it" in err


def test_weights_are_never_unpickled() -> None:
    """Source scan: every torch.load passes weights_only=True; nothing imports pickle."""
    root = Path(__file__).resolve().parents[2] / "graphprune"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path


def test_capture_error_names_module_operator_and_line() -> None:
    class Gate(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
                return x
            return -x

    model = tiny_llama(layers=1)
    model.model.layers[0].mlp.act_fn = Gate()
    with pytest.raises(CaptureError) as err:
        capture(model, random_tokens(1, 4))
    msg = str(err.value)
    assert "in model.layers.0.mlp.act_fn (Gate)" in msg and "operator Tensor.__bool__" in msg
    assert "test_user_errors.py:" in msg and "`if x.sum() > 0:" in msg and "\n" not in msg
