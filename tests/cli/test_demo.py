"""The README's main command (scripts/demo.sh) end to end on the tiny model: every step runs and the summary holds real figures."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from graphprune.data import default_text

pytestmark = pytest.mark.slow  # heavy: subprocesses running the whole job

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="scripts/demo.sh needs bash")
def test_demo_script_on_the_tiny_model(tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(default_text()[:12000])
    out = tmp_path / "demo"
    env = dict(os.environ)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # this environment's graphprune
        "GRAPHPRUNE_DEMO_MODEL": "tiny-llama",
        "GRAPHPRUNE_DEMO_OUT": str(out),
        "GRAPHPRUNE_DEMO_DATA": f"--text {text} --eval-len 256",
        "GRAPHPRUNE_DEMO_CALIB": "--calib-samples 4 --calib-len 64",
        "GRAPHPRUNE_DEMO_SKIP_INSTALL": "1",
        "GRAPHPRUNE_DEMO_RUNTIMES": "eager onnxruntime",  # the default is onnxruntime alone
    })
    res = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]

    dense = json.loads((out / "dense-eval.json").read_text())
    report = json.loads((out / "sparsegpt-50" / "report.json").read_text())
    export = json.loads((out / "export.json").read_text())
    sample = json.loads((out / "generate.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert export["purpose"] == "generation" and export["tokens_equal"] is True and export["check_tokens"] == 32
    assert export["bytes"] < export["dense_bytes"] and export["max_abs_diff"] <= 1e-3 and export["sparse_initializers"] > 0
    assert sample["new_tokens"] >= 1 and sample["runtime"] == "onnxruntime"
    summary = res.stdout[res.stdout.index("[5/5] summary"):]
    assert f"{dense['ppl']:.3f}" in summary and f"{report['ppl']:.3f}" in summary
    rows = re.findall(r"^(ttft-128 ms|decode-b1 tokens/s), (eager|onnxruntime)\s+\d+(?:\.\d)?\s+\d+(?:\.\d)? \(\d+\.\d+x \[", summary, re.M)
    assert sorted(rows) == sorted((c, r) for c in ("ttft-128 ms", "decode-b1 tokens/s") for r in ("eager", "onnxruntime")), summary
    assert "The pruned ONNX file continues" in summary
