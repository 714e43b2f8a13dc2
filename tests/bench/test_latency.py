"""The latency harness on tiny models with tiny repeats: structure of records, table, PNG (never timings)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphprune.bench.latency as latency
import graphprune.exporters.onnx as onnx_exporter
from graphprune.bench import BenchResult, BenchTarget, Case, LatencyRecord, bench_latency, machine_info, to_markdown, write_json, write_markdown, write_plot
from graphprune.bench.report import PLOT_COLUMNS, plot_figure
from graphprune.errors import ConfigError
from graphprune.exporters import ExportReport
from graphprune.kernels import CSRLinear
from graphprune.models.tiny import tiny_llama

CASES = [Case("prefill", 1, 8), Case("step", 1, 1)]
VOCAB = 256


def _pruned(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                groups = p.view(p.shape[0], -1, 4)
                groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = CSRLinear.from_module(mlp.down_proj)
    return model


def _handmade_onnx(path: Path) -> Path:
    """A minimal ``input_ids -> logits`` ONNX model (embedding Gather + MatMul), no torch export."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
            helper.make_node("MatMul", ["h", "head"], ["logits"]),
        ],
        "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((VOCAB, 16)).astype(np.float32), "emb"),
            numpy_helper.from_array(rng.standard_normal((16, VOCAB)).astype(np.float32), "head"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    dense = tiny_llama()
    return {"dense": dense, "pruned": _pruned(dense)}


@pytest.fixture(scope="module")
def result(models) -> BenchResult:
    return bench_latency(
        models, runtimes=("eager", "torchscript"), cases=CASES, repeats=3, warmup=1, threads=1, progress=False
    )


def test_one_record_per_case_runtime_target(result: BenchResult) -> None:
    keys = [(r.case, r.runtime, r.target) for r in result.records]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2
    for r in result.records:
        assert r.repeats == len(r.times_s) == 3 and all(t > 0 for t in r.times_s)
        assert r.min_s <= r.q1_s <= r.median_s <= r.q3_s <= r.max_s
        assert r.speedup_q1 <= r.speedup <= r.speedup_q3
        assert (r.batch, r.seq) == {"prefill": (1, 8), "step": (1, 1)}[r.case]
        assert r.baseline == "dense"
        if r.target == "dense":
            assert r.speedup == r.speedup_q1 == r.speedup_q3 == 1.0


def test_records_serialise(result: BenchResult, tmp_path: Path) -> None:
    data = json.loads(write_json(result, tmp_path / "latency.json").read_text())
    assert len(data["records"]) == len(result.records)
    assert data["baseline"] == "dense" and data["repeats"] == 3
    assert {"cpu", "logical_cores", "torch", "onnxruntime", "torch_threads"} <= set(data["machine"])


def test_markdown_table(result: BenchResult, tmp_path: Path) -> None:
    text = to_markdown(result)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(result.records)
    assert "speedup vs dense" in table[0] and "ms" not in table[0]  # CPU: ratios only (protocol)
    assert "Machine:" in text and "1 threads" in text
    absolute = to_markdown(result, absolute=True)
    assert "median ms" in absolute.splitlines()[2]
    assert write_markdown(result, tmp_path / "t.md").read_text() == text


def test_png_plot(result: BenchResult, tmp_path: Path) -> None:
    path = write_plot(result, tmp_path / "plots" / "latency.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["latency.png"]


def _synthetic(cases: list[tuple[str, int, int]], runtimes: list[str], speedups: dict[str, float]) -> BenchResult:
    """Records with known speedups (the first target is the baseline); IQR is speedup +- 10 %."""
    records = []
    for case, batch, seq in cases:
        for runtime in runtimes:
            for target, s in speedups.items():
                q1, q3 = (s, s) if s == 1.0 else (0.9 * s, 1.1 * s)
                records.append(
                    LatencyRecord(target, runtime, case, batch, seq, 5, 0.01 / s, 0.009 / s, 0.011 / s, 0.008 / s, 0.012 / s,
                                  "dense", s, q1, q3)
                )
    return BenchResult(records, {"cpu": "Synthetic CPU", "torch_threads": 2}, "dense", 5, 1)


def test_plot_has_one_panel_per_case_and_runtime(tmp_path: Path) -> None:
    speedups = {"dense": 1.0, "sgpt-50": 1.5, "sgpt-2of4": 0.8}
    result = _synthetic([("prefill", 1, 128), ("step", 1, 1)], ["eager", "onnxruntime"], speedups)
    fig = plot_figure(result)
    titles = sorted(ax.get_title() for ax in fig.axes)
    assert titles == ["prefill (1x128), eager", "prefill (1x128), onnxruntime", "step (1x1), eager", "step (1x1), onnxruntime"]
    for ax in fig.axes:
        assert ax.get_subplotspec().get_geometry()[:2] == (2, 2)  # a row per case, a column per runtime
        assert [t.get_text() for t in ax.get_xticklabels()] == ["dense", "sgpt-50", "sgpt-2of4"]
        assert [round(bar.get_height(), 6) for bar in ax.patches] == [1.0, 1.5, 0.8]  # the medians
        assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())  # the 1.0 reference
        errorbars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
        assert len(errorbars) == 3
        _, _, (segments,) = errorbars[1]
        (_, low), (_, high) = segments.get_segments()[0]
        assert (low, high) == pytest.approx((1.35, 1.65))  # the interquartile range of sgpt-50
        assert {"1.50x", "0.80x"} <= {t.get_text() for t in ax.texts}
    assert fig.axes[0].get_ylabel() == "speedup vs dense" and fig.axes[0].get_ylim()[0] == 0
    assert fig.get_size_inches() == pytest.approx((8.0, 7.2))  # 4 x 3.2 inches per panel (+ title)
    path = write_plot(result, tmp_path / "latency.png", title="tiny, speedup vs dense")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR chunk
    assert (width, height) == (800, 720)
    assert [p.name for p in tmp_path.iterdir()] == ["latency.png"]


def test_plot_wraps_many_panels(tmp_path: Path) -> None:
    """One runtime and six cases: panels wrap after PLOT_COLUMNS instead of one long strip."""
    cases = [(f"c{i}", 1, 2**i) for i in range(6)]
    fig = plot_figure(_synthetic(cases, ["eager"], {"dense": 1.0, "pruned": 2.0}))
    assert len(fig.axes) == 6
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(2, PLOT_COLUMNS)}
    assert fig.get_size_inches()[0] == pytest.approx(4.0 * PLOT_COLUMNS)


def test_targets_are_interleaved_with_rotation(models, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    runners = {}

    def fake_make_runner(target, runtime, example, threads, scratch, files):
        runners[target.name] = lambda ids, name=target.name: order.append(name)
        return runners[target.name]

    monkeypatch.setattr(latency, "_make_runner", fake_make_runner)
    targets = {**models, "third": models["dense"]}
    res = bench_latency(targets, runtimes=("eager",), cases=[Case("c", 1, 2)], repeats=3, warmup=0, progress=False)
    assert order == ["dense", "pruned", "third", "pruned", "third", "dense", "third", "dense", "pruned"]
    assert len(res.records) == 3


def test_file_targets_and_onnxruntime(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_file = _handmade_onnx(tmp_path / "lm.onnx")
    exported = []

    def fake_export(model, path, *, example_tokens, check):
        exported.append((tuple(example_tokens.shape), check))
        return ExportReport(path=_handmade_onnx(Path(path)), format="onnx", bytes=0, max_abs_diff=None, seconds=0.0)

    monkeypatch.setattr(onnx_exporter, "export_onnx", fake_export)
    targets = [BenchTarget("file", onnx=onnx_file), BenchTarget("model", model=models["dense"])]
    res = bench_latency(
        targets, runtimes=("onnxruntime",), cases=CASES, repeats=2, warmup=0, vocab_size=VOCAB, progress=False
    )
    assert exported == [((2, 16), False)]  # the model-only target was exported once, unchecked
    assert {(r.target, r.case) for r in res.records} == {(t, c.name) for t in ("file", "model") for c in CASES}
    assert res.machine["ort_provider"] == "CPUExecutionProvider"


def test_progress_bar_can_be_shown(models, capsys: pytest.CaptureFixture[str]) -> None:
    bench_latency({"dense": models["dense"]}, runtimes=("eager",), cases=[Case("c", 1, 2)], repeats=1, warmup=0)
    assert "latency" in capsys.readouterr().err
    bench_latency(
        {"dense": models["dense"]}, runtimes=("eager",), cases=[Case("c", 1, 2)], repeats=1, warmup=0, progress=False
    )
    assert capsys.readouterr().err == ""


def test_threads_are_restored(models) -> None:
    before = torch.get_num_threads()
    res = bench_latency(
        {"d": models["dense"]},
        runtimes=("eager",),
        cases=[Case("c", 1, 2)],
        repeats=1,
        warmup=0,
        threads=1,
        progress=False,
    )
    assert res.machine["torch_threads"] == 1 and torch.get_num_threads() == before


def test_machine_info() -> None:
    info = machine_info()
    assert info["logical_cores"] >= 1 and info["torch"] == torch.__version__ and info["cpu"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"runtimes": ("tvm",)}, "unknown runtime"),
        ({"baseline": "nope"}, "baseline"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_arguments(models, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        bench_latency(models, cases=CASES, progress=False, **kwargs)


def test_bad_targets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unique"):
        bench_latency([BenchTarget("a", tiny_llama()), BenchTarget("a", tiny_llama())], progress=False)
    forward = [Case("fwd", 1, 8)]
    with pytest.raises(ConfigError, match="vocab_size"):
        bench_latency([BenchTarget("f", onnx=tmp_path / "x.onnx")], runtimes=("onnxruntime",), cases=forward, progress=False)
    with pytest.raises(ConfigError, match="neither a generation export for onnxruntime"):  # a decode case needs a folder
        bench_latency([BenchTarget("f", onnx=tmp_path / "x.onnx")], runtimes=("onnxruntime",), vocab_size=VOCAB, progress=False)
    with pytest.raises(ConfigError, match="neither an ONNX file"):  # a forward case needs a logits file
        bench_latency([BenchTarget("g", generation={"onnxruntime": tmp_path})], runtimes=("onnxruntime",), cases=forward, vocab_size=VOCAB, progress=False)
    with pytest.raises(ConfigError, match="needs a model"):
        bench_latency(
            [BenchTarget("f", onnx=tmp_path / "x.onnx")], runtimes=("eager",), vocab_size=VOCAB, progress=False
        )


def test_generation_cases_time_prefill_and_cached_decode(tmp_path) -> None:
    """ttft and decode cases run the KV-cache interface (a sparse-kernel model included) and
    report decode tokens per second; forward cases still run beside them."""
    dense = tiny_llama().eval()
    cases = [Case("fwd", 1, 8), Case("ttft-s", 1, 8, "ttft"), Case("decode-s", 2, 8, "decode", 4)]
    # onnxruntime's generation runner is exercised in tests/exporters/test_generation.py (its
    # dynamo export is the slow part); here eager and TorchScript, the kernel model included
    runtimes = ("eager", "torchscript")
    result = bench_latency({"dense": dense, "pruned": _pruned(dense)}, runtimes, cases, repeats=2, warmup=0, progress=False)
    keys = {(r.case, r.runtime, r.target) for r in result.records}
    assert keys == {(c.name, rt, t) for c in cases for rt in runtimes for t in ("dense", "pruned")}
    for r in result.records:
        assert r.kind == {"fwd": "forward", "ttft-s": "ttft", "decode-s": "decode"}[r.case]
        if r.kind == "decode":
            assert r.shape == "2x8+4" and r.tokens_per_s == pytest.approx(2 * 4 / r.median_s)
            assert r.to_dict()["tokens_per_s"] == r.tokens_per_s
        else:
            assert r.tokens_per_s is None
    assert "tok/s" in to_markdown(result)


def test_case_groups_expand() -> None:
    from graphprune.pipeline.jobs import parse_cases

    names = [c.name for c in parse_cases(["prefill", "ttft", "decode", "step"])]
    assert names == ["prefill", "ttft-128", "ttft-512", "decode-b1", "decode-b8", "step-nocache"]
    decode = parse_cases(["decode-b8"])[0]
    assert (decode.kind, decode.batch, decode.seq, decode.new_tokens) == ("decode", 8, 128, 64)


def test_records_carry_the_file_size_and_the_memory_to_load(tmp_path: Path) -> None:
    """A given file's record holds its size on disk; loading a model file grows the process by
    at least its weights (a 4 MiB head here) in onnxruntime; eager runs no file."""
    rng = np.random.default_rng(1)
    big = tmp_path / "big.onnx"
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "head"], ["logits"])],
        "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((VOCAB, 4096)).astype(np.float32), "emb"),
            numpy_helper.from_array(rng.standard_normal((4096, VOCAB)).astype(np.float32), "head"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(big))
    small = _handmade_onnx(tmp_path / "small.onnx")
    result = bench_latency(
        [BenchTarget("small", onnx=small), BenchTarget("big", onnx=big)], runtimes=("onnxruntime",),
        cases=[Case("fwd", 1, 8)], repeats=1, warmup=0, vocab_size=VOCAB, progress=False,
    )
    by = {r.target: r for r in result.records}
    assert by["small"].file_bytes == small.stat().st_size and by["big"].file_bytes == big.stat().st_size
    if latency.resident_mib() is not None:  # Linux
        assert by["big"].load_mib is not None and by["big"].load_mib >= 4.0
    assert "memory to load, MiB" in to_markdown(result)
