"""Rotations and slicing on the default model: perplexity, prune seconds, parameter counts.

Configurations (PROTOCOL.md: 64x512 calibration, seed 0; perplexity over the 512-token
windows of the evaluation split):

* slicing 20 / 25 / 30 % of the PCA-rotated stream (no pruning);
* Wanda 50 % and SparseGPT 50 %, without rotation and with PCA, random-Hadamard and
  learned (RotPruner) rotations.

Everything runs in one process: the model is loaded once and deep-copied per
configuration. The rotation statistics (one dense calibration pass over the 64x512
calibration set, observers on the norm outputs and the writers' inputs) and each ``Q`` are
computed once and shared: PCA and Hadamard serve both solvers; the learned ``Q`` is learned
per kind of solver as ``graphprune prune --rotate learned`` does (for Wanda: masked-weight
error, PCA start; for SparseGPT: Optimal Brain Surgeon saliency, identity start, the
pass's default steps). Their one-time cost is reported
as ``rotation s``; ``prune s`` is the pass pipeline of the configuration (fold, rotate,
slice, calibrate and prune). The 30 % sliced model is also saved as a model folder,
reloaded with ``graphprune.models.load_model`` and compared with the graph.

    python benchmarks/rotations.py                  # every configuration not yet in the results
    python benchmarks/rotations.py --only "wanda 50%" "learned + wanda 50%"
    python benchmarks/rotations.py --force          # recompute everything

Writes benchmarks/results/rotations.json after every configuration, and rotations.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from graphprune.data import TokenSplits
from graphprune.eval import perplexity
from graphprune.exporters.hf import save_hf_folder
from graphprune.graph.model import GraphModel
from graphprune.graph.stream import find_stream, parameter_count
from graphprune.models import load_model
from graphprune.passes.fold_norms import FoldNormsPass
from graphprune.passes.infra import PassContext, PassManager, relative_diff
from graphprune.passes.observe import InsertObserversPass, RemoveObserversPass
from graphprune.passes.prune import CALIBRATION, PruneConfig, SequentialPrunePass
from graphprune.passes.rotate import LearnConfig, RotatePass, build_problem, collect_stream_stats
from graphprune.passes.slice import SlicePass
from graphprune.solvers import SparsitySpec
from graphprune.solvers.rotation import learn_rotation, pca_rotation, random_hadamard

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE.parent / "out" / "bench-rotations-cache.pt"  # the rotations
STATS = HERE.parent / "out" / "bench-rotations-stats.pt"  # the calibration statistics they come from

# name -> (rotation, slicing, method); in priority order (most important first)
CONFIGS: dict[str, tuple[str | None, float, str | None]] = {
    "pca slice 30%": ("pca", 0.30, None),
    "wanda 50%": (None, 0.0, "wanda"),
    "learned + wanda 50%": ("learned", 0.0, "wanda"),
    "sparsegpt 50%": (None, 0.0, "sparsegpt"),
    "learned + sparsegpt 50%": ("learned-obs", 0.0, "sparsegpt"),
    "pca + wanda 50%": ("pca", 0.0, "wanda"),
    "hadamard + wanda 50%": ("hadamard", 0.0, "wanda"),
    "pca slice 25%": ("pca", 0.25, None),
    "pca slice 20%": ("pca", 0.20, None),
    "pca + sparsegpt 50%": ("pca", 0.0, "sparsegpt"),
    "hadamard + sparsegpt 50%": ("hadamard", 0.0, "sparsegpt"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rotations(pristine: torch.nn.Module, calib: torch.Tensor, steps: int, lr: float, need: set[str]) -> dict[str, Any]:
    """The Qs named in ``need`` (pca, hadamard, learned, learned-obs) for the folded default model.

    Statistics and Qs are cached on disk; only the missing ones are computed.
    """
    cached: dict[str, Any] = {}
    if CACHE.is_file():
        cached = torch.load(CACHE, weights_only=False)
        if "learned" in cached and (cached["learned"]["steps"] != steps or cached["learned"]["lr"] != lr):
            del cached["learned"]
    missing = {k for k in need if k not in cached}
    if not missing:
        return cached
    gm = GraphModel.capture(copy.deepcopy(pristine), name="smollm2-135m")
    FoldNormsPass().run(gm, PassContext())
    stream = find_stream(gm)
    if "hadamard" in missing:
        t1 = time.perf_counter()
        had = random_hadamard(stream.width, torch.Generator().manual_seed(0))
        cached["hadamard"] = {"q": had, "importance": None, "seconds": time.perf_counter() - t1}
        missing.discard("hadamard")
    if not missing:
        torch.save(cached, CACHE)
        return cached
    if STATS.is_file():
        stats, t_stats = torch.load(STATS, weights_only=False)
    else:
        t0 = time.perf_counter()
        stats = collect_stream_stats(gm, stream, calib, batch_size=8, writers=True)
        t_stats = time.perf_counter() - t0
        STATS.parent.mkdir(parents=True, exist_ok=True)
        torch.save((stats, t_stats), STATS)
    log(f"rotation statistics over {stats.tokens} tokens in {t_stats:.0f}s")
    cached["calibration_tokens"] = stats.tokens
    cov = stats.pca_cov()
    t1 = time.perf_counter()
    pca, ev = pca_rotation(cov)
    t_pca = time.perf_counter() - t1
    cached.setdefault("pca", {"q": pca, "importance": ev, "seconds": t_stats + t_pca})
    problem = build_problem(gm, stream, stats)

    def learned(q0: torch.Tensor, score: str, n: int, rate: float, per_step: int, start: str) -> dict[str, Any]:
        t1 = time.perf_counter()
        res = learn_rotation(q0, problem, SparsitySpec(0.5), steps=n, lr=rate, blocks_per_step=per_step, score=score,
                             callback=lambda s, v: log(f"  learned rotation ({score}) step {s}: objective {v:.5f}"))
        imp = (res.q * (cov @ res.q)).sum(0)
        order = torch.argsort(imp, descending=True)
        t_learn = time.perf_counter() - t1
        log(f"learned rotation ({score}): objective {res.initial_loss:.5f} -> {res.final_loss:.5f} in {t_learn:.0f}s")
        return {"q": res.q[:, order], "importance": imp[order], "seconds": t_stats + t_learn, "score": score, "init": start,
                "objective": [res.initial_loss, res.final_loss], "steps": n, "lr": rate, "blocks_per_step": per_step}

    if "learned" in missing:  # for Wanda: masked-weight error from the PCA start
        cached["learned"] = learned(pca, "wanda", steps, lr, 4, "pca")
        cached["learned"]["seconds"] += t_pca
    if "learned-obs" in missing:  # for SparseGPT: the pass's defaults for Hessian solvers
        cfg = LearnConfig(SparsitySpec(0.5), method="sparsegpt")
        cached["learned-obs"] = learned(torch.eye(stream.width, dtype=torch.float64), cfg.score, cfg.steps, cfg.lr,
                                        cfg.blocks_per_step, cfg.start)
    torch.save(cached, CACHE)
    return cached


def run_config(name: str, pristine: torch.nn.Module, tokenizer: Any, rots: dict[str, Any], calib: torch.Tensor,
               windows: torch.Tensor, save_sliced: Path | None = None) -> dict[str, Any]:
    rotation, slicing, method = CONFIGS[name]
    model = copy.deepcopy(pristine)
    before = parameter_count(model)
    gm = GraphModel.capture(model, name="smollm2-135m")
    passes: list[Any] = []
    if rotation:
        r = rots[rotation]
        passes += [FoldNormsPass(), RotatePass("learned" if rotation.startswith("learned") else rotation, rotation=r["q"], importance=r["importance"])]
    if slicing:
        passes.append(SlicePass(slicing))
    if method:
        passes += [InsertObserversPass(hessian=True), SequentialPrunePass(PruneConfig(method, SparsitySpec(0.5), batch_size=8)), RemoveObserversPass()]
    ctx = PassContext(seed=0, progress=False, data={CALIBRATION: calib})
    manager = PassManager(passes, ctx)
    gm = manager.run(gm)
    prune_s = sum(s for _, _, s in manager.history)
    log(f"{name}: passes in {prune_s:.0f}s, evaluating")
    res = perplexity(gm, windows, batch_size=4)
    row: dict[str, Any] = {
        "rotation": rotation or "none",
        "slicing": slicing,
        "method": method or "none",
        "ppl": res["ppl"],
        "achieved_sparsity": gm.meta.get("prune_report", {}).get("achieved_sparsity", 0.0),
        "prune_seconds": round(prune_s, 1),
        "rotation_seconds": round(rots[rotation]["seconds"], 1) if rotation else 0.0,
        "eval_seconds": round(res["seconds"], 1),
        "width": find_stream(gm).width,
        "parameters_before": before,
        "parameters_after": parameter_count(model),
    }
    if slicing == 0.30:  # end to end: a loadable folder that reproduces the graph
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out = save_sliced or Path(tmp) / "sliced"
                save_hf_folder(model, tokenizer, out, overwrite=save_sliced is not None)
                reloaded = load_model(str(out))
                probe = windows[:1, :128]
                with torch.no_grad():
                    again = reloaded.model(input_ids=probe, use_cache=False).logits
                row["reload_rel_diff"] = relative_diff(again, gm(probe))
                row["reload_parameters"] = parameter_count(reloaded.model)
        except Exception as exc:  # keep the measured row; report the failure
            row["reload_error"] = f"{type(exc).__name__}: {exc}"
    return row


def write_markdown(rows: dict[str, Any], meta: dict[str, Any]) -> None:
    dense = json.loads((RESULTS / "dense.json").read_text()) if (RESULTS / "dense.json").exists() else None
    quality = json.loads((RESULTS / "prune_quality.json").read_text()) if (RESULTS / "prune_quality.json").exists() else {}
    # unrotated baselines measured by prune_quality.py when not measured here
    baseline = {k: v for k, v in quality.items() if k in ("wanda 50%", "sparsegpt 50%") and k not in rows}
    lines = [
        "# Rotations and slicing on SmolLM2-135M",
        "",
        f"Protocol: PROTOCOL.md (64x512 calibration, seed 0; perplexity over 512-token windows of the evaluation split). "
        f"Machine: {meta['machine']}. `rotation s` is the one-time cost of the rotation, shared by the rows using it "
        "(statistics pass + PCA; learned adds Cayley SGD); `prune s` is the configuration's pass pipeline "
        "(fold, rotate, slice, calibrate, prune).",
        "",
        "| configuration | width | perplexity | vs. same method unrotated | sparsity | prune s | rotation s | parameters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if dense:
        lines.append(f"| dense | 576 | {dense['ppl']:.3f} | - | 0 | - | - | {meta.get('dense_parameters', 0):,} |")
    for name in CONFIGS:
        r = rows.get(name)
        if r is None and name in baseline:
            b = baseline[name]
            lines.append(f"| {name} † | 576 | {b['ppl']:.3f} | - | {b['achieved_sparsity']:.3f} | {b['prune_seconds']:.0f} | 0 | "
                         f"{meta.get('dense_parameters', 0):,} |")
            continue
        if r is None:
            continue
        base = (rows.get(f"{r['method']} 50%") or baseline.get(f"{r['method']} 50%")) if r["rotation"] != "none" and r["method"] != "none" else None
        delta = f"{(r['ppl'] / base['ppl'] - 1) * 100:+.1f}%" if base else "-"
        lines.append(
            f"| {name} | {r['width']} | {r['ppl']:.3f} | {delta} | {r['achieved_sparsity']:.3f} | {r['prune_seconds']:.0f} | "
            f"{r['rotation_seconds']:.0f} | {r['parameters_after']:,} |"
        )
    for key, what in (("learned", "for Wanda (masked-weight error of Wanda masks)"),
                      ("learned-obs", "for SparseGPT (Optimal Brain Surgeon saliency w²/[H⁻¹]_jj of the dropped weights)")):
        lm = meta.get(key)
        if lm:
            lines += ["", f"Learned rotation {what}: {lm['steps']} Cayley SGD steps (lr {lm['lr']}, {lm.get('blocks_per_step', 4)} "
                      f"blocks per step), layer-wise objective {lm['objective'][0]:.5f} ({lm.get('init', 'pca')} start) -> "
                      f"{lm['objective'][1]:.5f}."]
    if baseline:
        lines += ["", "Unrotated rows marked † are taken from `prune_quality.json` (same protocol and pipeline)."]
    sliced = rows.get("pca slice 30%")
    if sliced and "reload_rel_diff" in sliced:
        lines += ["", f"The 30 % sliced model saved as a model folder reloads with {sliced['reload_parameters']:,} parameters; "
                  f"its logits match the graph's to a relative difference of {sliced['reload_rel_diff']:.1e}."]
    lines += ["", "Folding the final norm into the LM head unties SmolLM2's tied embedding, which adds 49152 x width "
              "parameters; the parameter counts include it."]
    (RESULTS / "rotations.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="configuration names")
    ap.add_argument("--force", action="store_true", help="recompute configurations already in the results")
    ap.add_argument("--steps", type=int, default=30, help="learned rotation: Cayley SGD steps")
    ap.add_argument("--lr", type=float, default=0.1, help="learned rotation: step size (rotation angle)")
    ap.add_argument("--save-sliced", default=None, help="keep the 30 %% sliced model folder here (for benchmarks/latency.py)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("GP_THREADS", "2")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "rotations.json"
    data = json.loads(out_json.read_text()) if out_json.exists() else {}
    rows: dict[str, Any] = data.get("rows", {})
    log("loading the default model")
    loaded = load_model("smollm2-135m")
    pristine = loaded.model
    splits = TokenSplits.from_text(loaded.tokenizer)
    calib = splits.calibration(64, 512, 0)
    windows = splits.eval_windows(512)
    todo = [name for name in CONFIGS if (not args.only or name in args.only) and (args.force or name not in rows)]
    rots = rotations(pristine, calib, args.steps, args.lr, {CONFIGS[n][0] for n in todo if CONFIGS[n][0]})
    meta = dict(data.get("meta", {}))
    meta.update({
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch eager float32",
        "dense_parameters": parameter_count(pristine),
    })
    if "learned" in rots:
        meta["learned"] = {k: rots["learned"][k] for k in ("objective", "steps", "lr") if k in rots["learned"]}
    if "learned-obs" in rots:
        meta["learned-obs"] = {k: rots["learned-obs"][k] for k in ("objective", "steps", "lr", "blocks_per_step", "init")}
    if "calibration_tokens" in rots:
        meta["calibration_tokens"] = rots["calibration_tokens"]
    save_sliced = Path(args.save_sliced) if args.save_sliced else None
    for name in todo:
        log(f"running {name}")
        rows[name] = run_config(name, pristine, loaded.tokenizer, rots, calib, windows, save_sliced)
        log(f"  {rows[name]}")
        out_json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float) + "\n")
        write_markdown(rows, meta)
    write_markdown(rows, meta)


if __name__ == "__main__":
    main()
