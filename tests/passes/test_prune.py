"""Sequential pruning through the graph: exact patterns, forward propagation of pruned outputs."""
from __future__ import annotations

import pytest
import torch

from graphprune.errors import ConfigError, DataError
from graphprune.graph.model import GraphModel
from graphprune.models.tiny import random_tokens
from graphprune.passes.infra import PassContext, PassManager
from graphprune.passes.observe import InsertObserversPass
from graphprune.passes.prune import PruneConfig, SequentialPrunePass, parse_rules, prune_pass
from graphprune.solvers import SparsitySpec


def _prune(gm, method="magnitude", spec=None, keep_stats=False, calib=None, rules=(), calib_dtype="float32"):
    spec = SparsitySpec(0.5) if spec is None else spec
    calib = random_tokens(8, 24, seed=11) if calib is None else calib
    config = PruneConfig(method, spec, list(rules), batch_size=3, keep_stats=keep_stats, calib_dtype=calib_dtype)
    ctx = PassContext(progress=False, calibration=calib)
    return PassManager([prune_pass(config)], ctx).run(gm), calib


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_patterns_on_every_weight(tiny_gm, method, pattern) -> None:
    spec = SparsitySpec.parse(0.6 if pattern == "unstructured" else None, pattern)
    gm, _ = _prune(tiny_gm, method, spec)
    report = gm.state.prune_report
    assert len(report["layers"]) == len(gm.block_linears())
    for li in gm.block_linears():
        w = gm.model.get_submodule(li.name).weight.detach()
        mask = gm.state.masks[li.name]
        assert torch.equal(w != 0, mask) or ((w == 0) | mask).all()  # pruned weights are exactly zero
        assert not w[~mask].any()
        if spec.is_nm:
            groups = (w.reshape(w.shape[0], -1, spec.m) != 0).sum(-1)
            assert (groups <= spec.n).all()
            assert int((~mask).sum()) == w.numel() * (spec.m - spec.n) // spec.m
        elif method == "sparsegpt":
            assert int((~mask).sum()) >= int(0.6 * w.numel()) - w.shape[1]  # per-block counting
        else:
            assert int((~mask).sum()) == w.shape[0] * int(0.6 * w.shape[1])
    assert abs(report["achieved_sparsity"] - spec.sparsity) < 0.01


def test_pruned_outputs_feed_the_next_stage() -> None:
    from graphprune.models.tiny import tiny_llama

    model = tiny_llama()
    gm, calib = _prune(GraphModel.capture(model), "magnitude", SparsitySpec(0.7), keep_stats=True)
    # Recompute block 1's q/k/v input statistics from the final (all pruned) model.
    captured = []
    layer1 = model.model.layers[1].self_attn.q_proj
    handle = layer1.register_forward_hook(lambda m, i, o: captured.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for ids in calib.split(3):
            model(input_ids=ids, use_cache=False)
    handle.remove()
    x = torch.cat(captured).double()
    used = gm.state.stats["model.layers.1.self_attn.q_proj"]
    assert used.count == x.shape[0]
    expected = x.T @ x  # float32 micro-batch products summed in float64 vs a float64 product
    torch.testing.assert_close(used.xtx, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # ...and they differ from the statistics a dense block 0 would have produced
    dense = tiny_llama()
    captured.clear()
    handle = dense.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: captured.append(i[0].detach().reshape(-1, i[0].shape[-1]))
    )
    with torch.no_grad():
        dense(input_ids=calib, use_cache=False)
    handle.remove()
    xd = torch.cat(captured).double()
    assert (used.xtx - xd.T @ xd).abs().max() > 1e-2 * (xd.T @ xd).abs().max()


def test_sparsegpt_beats_wanda_beats_magnitude_on_layer_error(tiny_gm) -> None:
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        gm, _ = _prune(tiny_gm.clone(), method, SparsitySpec(0.5))
        errs[method] = sum(e["error"] for e in gm.state.prune_report["layers"])
    assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bfloat16_calibration_gives_the_same_patterns_from_nearly_the_same_statistics(tiny_gm, method) -> None:
    """``calib_dtype="bfloat16"``: the same exact patterns, the report says so, and the statistics
    move by bfloat16 rounding of the forwards only: every Linear's layer error (measured on its
    own statistics) stays within 10 % of the float32 run's, and most masks agree."""
    spec = SparsitySpec(0.5)
    ref, _ = _prune(tiny_gm.clone(), method, spec)
    gm, _ = _prune(tiny_gm.clone(), method, spec, calib_dtype="bfloat16")
    report = gm.state.prune_report
    assert report["calibration_dtype"] == "bfloat16" and ref.state.prune_report["calibration_dtype"] == "float32"
    assert report["achieved_sparsity"] == pytest.approx(ref.state.prune_report["achieved_sparsity"], abs=1e-12)
    agree = total = 0
    for a, b in zip(ref.state.prune_report["layers"], report["layers"], strict=True):
        assert a["name"] == b["name"] and a["sparsity"] == b["sparsity"]
        assert b["rel_error"] == pytest.approx(a["rel_error"], rel=0.1)
        ma, mb = ref.state.masks[a["name"]], gm.state.masks[b["name"]]
        agree += int((ma == mb).sum())
        total += ma.numel()
    assert 0.95 < agree / total < 1.0  # moved by the rounding, but only at the margin


def test_an_unknown_calibration_dtype_is_refused_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match=r"unknown calibration dtype 'float16'; use one of float32, bfloat16"):
        PruneConfig("wanda", SparsitySpec(0.5), calib_dtype="float16")


def test_overrides_and_skip(tiny_gm) -> None:
    down = "*.down_proj" if any(li.name.endswith("down_proj") for li in tiny_gm.linears) else "*.fc2"
    rules = parse_rules({down: "skip", "*.q_proj": 0.25, "*.k_proj": "2:4"}, SparsitySpec(0.5))
    gm, _ = _prune(tiny_gm, "wanda", SparsitySpec(0.5), rules=rules)
    by_name = {e["name"]: e for e in gm.state.prune_report["layers"]}
    assert not any(n.endswith(("down_proj", "fc2")) for n in by_name)
    q = next(e for n, e in by_name.items() if n.endswith("q_proj"))
    k = next(e for n, e in by_name.items() if n.endswith("k_proj"))
    assert q["sparsity"] == pytest.approx(0.25) and k["pattern"] == "2:4"


def test_bad_inputs(tiny_gm) -> None:
    with pytest.raises(ConfigError, match="multiple of 3"):
        _prune(tiny_gm.clone(), "magnitude", SparsitySpec.parse(None, "1:3"))
    gm = tiny_gm
    pm = PassManager([InsertObserversPass(), SequentialPrunePass(PruneConfig("wanda", SparsitySpec(0.5)))], PassContext(progress=False))
    with pytest.raises(DataError, match="calibration token ids"):
        pm.run(gm)
    with pytest.raises(ConfigError, match="must be a sparsity"):
        parse_rules({"*": [1]}, SparsitySpec(0.5))


def test_an_override_that_matches_nothing_is_refused(tiny_gm) -> None:
    """A typo in a glob must not silently prune with the default: the error names the glob and near names."""
    leaf = tiny_gm.block_linears()[0].name.rsplit(".", 1)[1]
    rules = parse_rules({f"*.{leaf}x": "skip"}, SparsitySpec(0.5))
    with pytest.raises(ConfigError, match=rf"override '\*\.{leaf}x' matches none of the \d+ prunable Linears; nearest: .*{leaf}"):
        _prune(tiny_gm, "magnitude", SparsitySpec(0.5), rules=rules)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_stage_profile_counts_the_block_arithmetic(tiny_gm, method) -> None:
    """Each stage reports its forward / statistics / solve / propagation seconds and the
    multiply-adds of its forward and statistics: the Linear part equals what torch's FLOP
    counter measures for the blocks' matmuls, the statistics part the observers' arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode

    from graphprune.passes.observe import xtx_macs  # checked against the FLOP counter in test_observe.py

    calib = random_tokens(4, 24, seed=1)
    gm = PassManager([prune_pass(PruneConfig(method, SparsitySpec(0.5), batch_size=2), hessian=method == "sparsegpt")],
                     PassContext(progress=False, calibration=calib)).run(tiny_gm)
    rep = gm.state.prune_report
    tokens = calib.numel()
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            gm(calib)
    counts = counter.get_flop_counts()["Global"]
    matmul_macs = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm")) / 2
    head = tokens * gm.model.config.hidden_size * gm.model.config.vocab_size
    cfg = gm.model.config
    width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    attention = calib.shape[0] * 2 * (24 * 25 / 2) * width * len(gm.blocks)
    total_full = sum(st["profile"]["propagation_macs"] for st in rep["stages"])
    assert total_full == pytest.approx(matmul_macs - head + attention, rel=1e-3)
    # the calibration forward stops at the last observed input: the down projections are not run
    total_forward = sum(st["profile"]["forward_macs"] for st in rep["stages"])
    down = sum(tokens * b.linears[-1].in_features * b.linears[-1].out_features for b in gm.blocks)
    assert total_forward == pytest.approx(total_full - down, rel=1e-9)
    expected_stats = 0.0
    for block in gm.blocks:
        inputs = {id(li.node.args[0]): li.in_features for li in block.linears}  # q/k/v and gate/up share one observer
        expected_stats += sum(tokens * d + (xtx_macs(d, tokens) if method == "sparsegpt" else 0) for d in inputs.values())
    assert sum(st["profile"]["statistics_macs"] for st in rep["stages"]) == pytest.approx(expected_stats, rel=1e-9)
    for st in rep["stages"]:
        p = st["profile"]
        assert p["tokens"] == tokens
        parts = p["forward_seconds"] + p["statistics_seconds"] + p["solve_seconds"] + p["propagation_seconds"]
        assert all(p[k] >= 0 for k in ("forward_seconds", "statistics_seconds", "solve_seconds", "propagation_seconds"))
        assert parts <= st["seconds"] + 1e-3
    prof = rep["calibration_profile"]
    assert prof["forward_gmac"] == pytest.approx(total_forward / 1e9, abs=1e-3)
    assert prof["propagation_gmac"] == pytest.approx(total_full / 1e9, abs=1e-3)
    assert prof["forward_gflops"] > 0
