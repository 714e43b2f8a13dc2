"""Scripted pipelines: the Python API behind ``graphprune prune`` and ``graphprune eval``.

Example::

    from graphprune.pipeline import PruneJob, run_prune

    outcome = run_prune(PruneJob(model="smollm2-135m", method="sparsegpt", sparsity=0.5,
                                 out="out/smollm2-sparsegpt50", evaluate=True))
    print(outcome.report["ppl"], outcome.report["achieved_sparsity"])
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from graphprune.data import PROTOCOL_EVAL_TEXTS, TextSplits, load_texts
from graphprune.distributed import current
from graphprune.errors import ConfigError, ExportError, ModelLoadError
from graphprune.eval import perplexity, sharded_perplexity
from graphprune.exporters.common import ort_session
from graphprune.exporters.hf import ShardedWriter, check_output_dir, save_hf_folder
from graphprune.graph.edit import export_blockers, parameter_count
from graphprune.graph.lazy import LazyStageIO, LazyWeights, retarget_meta
from graphprune.graph.model import GraphModel
from graphprune.models import LoadedModel, load_model
from graphprune.models.lazy import SafetensorsSource, load_lazy
from graphprune.models.loader import check_finite, load_tokenizer
from graphprune.passes.checkpoint import StageCheckpoint
from graphprune.passes.fold_norms import FoldNormsPass
from graphprune.passes.infra import Pass, PassContext, PassManager, peak_rss_mb, release_free_memory
from graphprune.passes.prune import LayerRule, PruneConfig, StageIO, calibration_compute_dtype, parse_rules, prune_pass
from graphprune.passes.rotate import LearnConfig, RotatePass
from graphprune.passes.slice import SlicePass
from graphprune.passes.structured import structured_pass
from graphprune.pipeline.checkpoints import open_checkpoint
from graphprune.pipeline.jobs import EvalJob, PruneJob, check_eval_windows
from graphprune.solvers import SolverInfo, SparsitySpec, get_solver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrunePlan:
    """What a :class:`PruneJob` asks for, validated once: the rotation (``None`` for none),
    whether it prunes, the sparsity target, the override rules and the solver."""

    rotation: str | None
    prunes: bool
    spec: SparsitySpec
    rules: list[LayerRule]
    solver: SolverInfo

    @classmethod
    def of(cls, job: PruneJob) -> "PrunePlan":
        """Validate ``job`` (rotation, sparsity, overrides, method) before anything is loaded."""
        rotation = job.rotation_source()
        job.check_structured()
        prunes = job.prunes()
        spec = job.spec() if prunes else SparsitySpec(0.0)
        solver = get_solver(job.method)  # unknown method -> clear error before loading anything
        calibration_compute_dtype(job.calib_dtype)
        job.check_texts()
        return cls(rotation, prunes, spec, parse_rules(job.overrides, spec), solver)


@dataclass
class PruneOutcome:
    gm: GraphModel
    loaded: LoadedModel
    report: dict[str, Any]


def check_length(loaded: LoadedModel, length: int, what: str) -> None:
    limit = getattr(loaded.config, "max_position_embeddings", None)
    if limit is not None and length > int(limit):
        raise ConfigError(f"{what} {length} exceeds {loaded.name}'s context of {limit} tokens; use a length <= {limit}.")


def _splits(loaded: LoadedModel, text: Sequence[str]) -> TextSplits:
    return TextSplits.from_texts(loaded.tokenizer, load_texts(text))


def eval_text_specs(text: Sequence[str], eval_text: Sequence[str] = ()) -> list[str]:
    """The texts a run evaluates on: ``eval_text`` if given, else the run's own ``--text``
    files, else the protocol's two texts (``pydoc`` then ``news``)."""
    return list(eval_text) or list(text) or list(PROTOCOL_EVAL_TEXTS)


def evaluate_texts(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Any,
    specs: Sequence[str],
    length: int,
    batch_size: int = 4,
    progress: bool = False,
    max_windows: int | None = None,
) -> dict[str, Any]:
    """Protocol perplexity on each text's evaluation split (sharded across ranks under torchrun).

    ``max_windows`` scores only the first that many windows of each text: a quick check whose
    figure is not the protocol's (the protocol scores every window).

    Returns the first text's ``ppl``, ``nll`` and ``tokens`` at the top level (the headline
    figure) and every text's under ``texts``: ``{name: {"ppl", "nll", "tokens", "windows",
    "windows_total"}}``.
    """
    windows = TextSplits.from_texts(tokenizer, load_texts(specs)).eval_windows(length)
    dist = current()
    texts: dict[str, dict[str, Any]] = {}
    seconds = 0.0
    for name, every in windows.items():
        w = every if max_windows is None else every[:max_windows]
        if dist.active:
            res = sharded_perplexity(logits_fn, w, dist, progress=progress and dist.is_main)
        else:
            res = perplexity(logits_fn, w, batch_size=batch_size, progress=progress)
        seconds += res["seconds"]
        texts[name] = {"ppl": res["ppl"], "nll": res["nll"], "tokens": res["tokens"], "windows": int(w.shape[0]), "windows_total": int(every.shape[0])}
    first = next(iter(texts.values()))
    return {**first, "seconds": seconds, "texts": texts}


EXPORTED_SUFFIXES = (".onnx", ".pt")


def run_eval(job: EvalJob, progress: bool = True) -> dict[str, Any]:
    """Perplexity of a model per the protocol (a model, an exported ``.onnx`` / ``.pt`` logits
    file, or a generation export folder)."""
    check_eval_windows(job.eval_windows)
    if Path(job.model).suffix in EXPORTED_SUFFIXES:
        return _eval_file(job, progress)
    if is_generation_folder(job.model):
        return _eval_generation(job, progress)
    t0 = time.perf_counter()
    loaded = load_model(job.model, trust_remote_code=job.trust_remote_code)
    check_length(loaded, job.eval_len, "--eval-len")
    model = loaded.model

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        res = evaluate_texts(logits, loaded.tokenizer, eval_text_specs(job.text), job.eval_len, job.batch_size, progress, job.eval_windows)
    return {"model": loaded.name, **res, "seconds": time.perf_counter() - t0, "eval_seconds": res["seconds"]}


def _eval_generation(job: EvalJob, progress: bool) -> dict[str, Any]:
    """Perplexity through a generation export, the way it generates: every window is fed one
    token per call with the KV cache (the file returns the last position's logits only), so
    the cache path that serves generation is what gets scored."""
    from graphprune.exporters.kv import read_description
    from graphprune.exporters.runners import load_runner

    t0 = time.perf_counter()
    folder = Path(job.model)
    desc = read_description(folder)
    runner = load_runner(folder)
    tokenizer = _file_tokenizer(folder / desc["file"], job)

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        past = runner.layout.empty_past(batch)
        out = []
        for t in range(length):
            mask = torch.ones(batch, t + 1, dtype=torch.long)
            pos = torch.full((batch, 1), t, dtype=torch.long)
            logits, past = runner.step(ids[:, t : t + 1], mask, pos, past)
            out.append(logits[:, -1].float())
        return torch.stack(out, dim=1)

    with torch.no_grad():
        res = evaluate_texts(logits_fn, tokenizer, eval_text_specs(job.text), job.eval_len, job.batch_size, progress, job.eval_windows)
    runtime = "onnxruntime (CPUExecutionProvider)" if desc["format"] == "onnx" else "torch.jit.load"
    return {"model": folder.name, "runtime": f"{runtime}, token by token with the KV cache", **res,
            "seconds": time.perf_counter() - t0, "eval_seconds": res["seconds"]}


def is_generation_folder(spec: str) -> bool:
    from graphprune.exporters.kv import DESCRIPTION, GENAI_CONFIG

    folder = Path(spec)
    return folder.is_dir() and ((folder / DESCRIPTION).is_file() or (folder / GENAI_CONFIG).is_file())


def _eval_file(job: EvalJob, progress: bool) -> dict[str, Any]:
    """Perplexity of the file that ships: an ONNX file in onnxruntime or a TorchScript file,
    both ``input_ids -> logits`` as ``graphprune export`` writes them."""
    t0 = time.perf_counter()
    path = Path(job.model)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give an exported .onnx or .pt file (graphprune export).")
    tokenizer = _file_tokenizer(path, job)
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    if path.suffix == ".onnx":
        try:
            session = ort_session(path)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        names = [i.name for i in session.get_inputs()]
        if names != ["input_ids"]:
            raise ConfigError(f"{path} takes {names}, not input_ids alone: evaluate a logits export (graphprune export without --for generation).")

        def logits_fn(ids: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])

        runtime = "onnxruntime (CPUExecutionProvider)"
    else:
        try:
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        except Exception as exc:  # torch raises RuntimeError for non-TorchScript files
            raise ModelLoadError(f"{path} is not a TorchScript file torch.jit.load can read: {exc}") from exc

        def logits_fn(ids: torch.Tensor) -> torch.Tensor:
            out = module(ids)
            if not isinstance(out, torch.Tensor):
                raise ConfigError(f"{path} does not return a logits tensor: evaluate a logits export (graphprune export without --for generation).")
            return out

        runtime = "torch.jit.load"
    with torch.no_grad():
        res = evaluate_texts(logits_fn, tokenizer, eval_text_specs(job.text), job.eval_len, job.batch_size, progress, job.eval_windows)
    return {"model": path.name, "runtime": runtime, **res, "seconds": time.perf_counter() - t0, "eval_seconds": res["seconds"]}


def _file_tokenizer(path: Path, job: EvalJob) -> Any:
    spec = job.tokenizer
    if spec is None:
        try:
            return load_tokenizer(path.parent)
        except ModelLoadError as exc:
            raise ConfigError(
                f"{path.parent} holds no tokenizer for {path.name}; give --tokenizer (the model folder it was exported "
                "from, or a built-in model name such as smollm2-135m)."
            ) from exc
    if Path(spec).is_dir():
        return load_tokenizer(Path(spec), job.trust_remote_code)
    return load_model(spec, trust_remote_code=job.trust_remote_code).tokenizer


def run_prune(
    job: PruneJob,
    progress: bool = True,
    on_stage: Callable[[int, int, dict[str, Any]], None] | None = None,
    finish: Callable[[Path, "PruneOutcome"], None] | None = None,
) -> PruneOutcome:
    """Load, capture, calibrate and prune stage by stage, optionally evaluate and save.

    ``finish(staging_folder, outcome)`` may add files (exports, benchmarks) to the output
    folder before it is renamed into place; the checkpoint is deleted only after that.
    """
    t0 = time.perf_counter()
    dist = current()  # torchrun: every rank runs this; rank 0 writes files and shows progress
    progress = progress and dist.is_main
    plan = PrunePlan.of(job)
    if job.out is not None:
        check_output_dir(job.out, job.overwrite)  # on every rank, so all stop together
    if job.lazy:
        check_lazy(job, plan.rotation, plan.solver.needs_grad, finish is not None)
    torch.manual_seed(job.seed)
    source: SafetensorsSource | None = None
    if job.lazy:
        loaded, source = load_lazy(job.model, trust_remote_code=job.trust_remote_code)
    else:
        loaded = load_model(job.model, trust_remote_code=job.trust_remote_code, seed=job.seed)
        check_finite(loaded.model, loaded.name)
    check_length(loaded, job.calib_len, "--calib-len")
    if job.evaluate:
        check_length(loaded, job.eval_len, "--eval-len")
    splits = _splits(loaded, job.text)
    calib = splits.calibration(job.calib_samples, job.calib_len, job.seed, list(job.text_weights) or None)
    checkpoint = open_checkpoint(job, calib) if dist.is_main else None
    t_load = time.perf_counter()
    parameters_before = parameter_count(loaded.model)
    gm = GraphModel.capture(loaded.model, name=loaded.name)
    model_bytes = 4 * parameters_before  # what the freed temporaries below scale with
    release_free_memory(model_bytes)  # the tracer's temporaries
    t_capture = time.perf_counter()
    # lazy: the weights exist one block at a time, so no whole-model probe forward can verify passes
    ctx = PassContext(seed=job.seed, verify=not job.lazy, progress=progress, calibration=calib)
    stage_io: LazyStageIO | None = None
    if source is not None:
        assert job.out is not None  # check_lazy
        writer = ShardedWriter(job.out, job.overwrite) if dist.is_main else None
        retarget_meta(gm)  # the skeleton was traced on the meta device
        stage_io = LazyStageIO(LazyWeights(gm, source.get), writer)
    try:  # lazy: any failure until the folder is published removes the shards written so far
        passes = build_passes(job, gm, plan=plan, on_stage=on_stage, checkpoint=checkpoint, stage_io=stage_io)
        manager = PassManager(passes, ctx)
        gm = manager.run(gm)
        t_prune = time.perf_counter()
        pruned = gm.state.prune_report
        report: dict[str, Any] = dict(pruned) if pruned is not None else {"method": "none", "pattern": "dense", "achieved_sparsity": 0.0}
        report.update(
            {
                "model": loaded.name,
                "job": {k: v for k, v in asdict(job).items() if k not in ("overwrite",)},
                "solver": plan.solver.description if plan.prunes else "none",
                "load_seconds": round(t_load - t0, 2),
                "capture_seconds": round(t_capture - t_load, 2),
                "prune_seconds": round(t_prune - t_capture, 2),
                "parameters_before": parameters_before,
                "parameters_after": parameter_count(loaded.model),
            }
        )
        if plan.rotation is not None:
            report.update(_rotation_report(gm, manager))
        if gm.state.structured is not None:
            report["structured"] = gm.state.structured
        if job.evaluate:
            release_free_memory(model_bytes)  # the calibration activations and statistics are gone
            res = evaluate_texts(gm, loaded.tokenizer, eval_text_specs(job.text, job.eval_text), job.eval_len, 4, progress, job.eval_windows)
            report.update({"ppl": res["ppl"], "eval_tokens": res["tokens"], "eval_seconds": round(res["seconds"], 2),
                           "eval": {name: {k: r[k] for k in ("ppl", "tokens", "windows", "windows_total")} for name, r in res["texts"].items()}})
            if job.eval_windows is not None:
                report["eval_windows"] = job.eval_windows  # a quick check on the first windows, not the protocol figure
        if dist.active:
            report["processes"] = dist.world
        report["total_seconds"] = round(time.perf_counter() - t0, 2)
        report["peak_rss_mb"] = round(peak_rss_mb(), 1)
        outcome = PruneOutcome(gm, loaded, report)
        if stage_io is not None:
            report["lazy"] = stage_io.summary()
            if dist.is_main:
                stage_io.finish(loaded.model, loaded.tokenizer, report)
        elif job.out is not None and dist.is_main:
            _check_exportable(gm)
            release_free_memory(model_bytes)  # evaluation's logits
            extra = (lambda tmp: finish(tmp, outcome)) if finish is not None else None
            save_hf_folder(loaded.model, loaded.tokenizer, job.out, overwrite=job.overwrite, extra_json={"report.json": report}, extra=extra)
    except BaseException:
        if stage_io is not None:
            stage_io.abort()
        raise
    if checkpoint is not None:
        checkpoint.remove()
    dist.barrier()  # every rank returns once rank 0 has written the outputs
    return outcome


def check_lazy(job: PruneJob, rotation: str | None, needs_grad: bool, has_finish: bool) -> None:
    """Refuse what stage-at-a-time pruning cannot do, naming the way out."""
    if job.out is None:
        raise ConfigError("lazy pruning writes each block as it finishes; give an output folder (--out).")
    if rotation is not None:
        raise ConfigError("rotations and slicing change every block at once and need the whole model; run them without --lazy.")
    if needs_grad:
        raise ConfigError(f"{job.method} needs gradients of the whole model's loss; run it without --lazy.")
    if job.evaluate:
        raise ConfigError("--eval needs the whole model; evaluate the written folder with `graphprune eval --model DIR`.")
    if has_finish:
        raise ConfigError("export and bench steps need the pruned model in memory; run them on the written folder in a second recipe.")


def build_passes(
    job: PruneJob,
    gm: GraphModel,
    *,
    plan: PrunePlan | None = None,
    on_stage: Callable[[int, int, dict[str, Any]], None] | None = None,
    checkpoint: StageCheckpoint | None = None,
    stage_io: StageIO | None = None,
) -> list[Pass]:
    """The passes of ``job`` on ``gm``: fold, rotate and slice (with a rotation), then the
    calibrate-and-prune pass (unless the job only rotates). The one place that wires them.
    ``plan`` is ``PrunePlan.of(job)`` when the caller has already validated the job."""
    plan = plan or PrunePlan.of(job)
    passes = _rotation_passes(job, plan.rotation, plan.spec, gm)
    if job.structured:
        if current().active:
            raise ConfigError("structured pruning runs in one process; run it without torchrun.")
        passes.append(
            structured_pass(job.structured, job.structured_method, batch_size=job.batch_size, budget=job.structured_budget, units=job.structured_units)
        )
    if plan.prunes:
        config = PruneConfig(job.method, plan.spec, plan.rules, dict(job.options), job.refine_steps, job.batch_size, calib_dtype=job.calib_dtype)
        # XᵀX only where something reads it: the solver, masked-gradient refinement, or the report's layer errors
        hessian = plan.solver.needs_hessian or job.refine_steps > 0 or job.layer_errors
        passes.append(prune_pass(config, hessian=hessian, on_stage=on_stage, checkpoint=checkpoint, stage_io=stage_io))
    return passes


def _rotation_passes(job: PruneJob, rotation: str | None, spec: SparsitySpec, gm: GraphModel) -> list[Pass]:
    """Fold, rotate and slice passes for ``job`` (none without a rotation)."""
    if rotation is None:
        return []
    if job.out is not None and any(n.kind == "layernorm" for n in gm.norms):
        raise ExportError(
            f"{gm.name} uses LayerNorm: a rotated LayerNorm stream needs RMSNorm, which transformers' "
            f"{type(gm.model).__name__} cannot express, so the result cannot be saved as a model folder. "
            "Rotate this model through the Python API (graph only), or rotate a RMSNorm (LLaMA-family) model."
        )
    learn = LearnConfig.from_options(spec, job.method, dict(job.rotation_options)) if rotation == "learned" else None
    if job.rotation_options and rotation != "learned":
        raise ConfigError(f"rotation options {sorted(job.rotation_options)} only apply to --rotate learned.")
    passes: list[Pass] = [FoldNormsPass(), RotatePass(rotation, learn=learn, samples=job.rotation_samples, batch_size=job.batch_size)]
    if job.slicing:
        passes.append(SlicePass(job.slicing))
    return passes


def _rotation_report(gm: GraphModel, manager: PassManager) -> dict[str, Any]:
    rot = {k: v for k, v in (gm.state.rotation or {}).items() if k != "importance"}
    seconds = manager.seconds(("fold_norms", "rotate", "slice"))
    out: dict[str, Any] = {"rotation": rot, "rotation_seconds": round(sum(seconds.values()), 2)}
    if gm.state.slicing is not None:
        out["slicing"] = gm.state.slicing
    return out


def _check_exportable(gm: GraphModel) -> None:
    blockers = export_blockers(gm)
    if blockers:
        raise ExportError(f"{gm.name} cannot be saved as a Hugging Face folder: {'; '.join(blockers)}.")
