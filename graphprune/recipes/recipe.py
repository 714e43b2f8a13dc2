"""YAML recipes: a whole pipeline in one file, validated against a strict schema.

A recipe is a mapping of *sections*. Most sections fill a :class:`PruneJob` (the Python
pipeline behind ``graphprune prune``); ``export`` and ``bench`` are *steps* that run after
pruning, inside the output folder's staging copy, so the folder appears complete or not at
all. Example (``recipes/wanda-2of4.yaml``)::

    model: smollm2-135m
    calibration: {samples: 64, length: 512, seed: 0}
    prune:
      method: wanda
      pattern: "2:4"
      overrides: {"*.down_proj": skip}
    eval: true
    output: {dir: out/wanda-2of4}

Round trips: ``Recipe.from_job(job).to_job() == job`` and
``Recipe.from_yaml(r.to_yaml()) == r``. New sections (a job option or a step) are added with
:func:`register_section`; see docs/RECIPES.md for the schema.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping as MappingT

from tqdm.auto import tqdm

from graphprune.bench.latency import PROTOCOL_CASES, RUNTIMES
from graphprune.errors import RecipeError
from graphprune.passes.prune import parse_rules
from graphprune.pipeline import PruneJob, PruneOutcome, run_prune
from graphprune.recipes.schema import MISSING, Dict, Invalid, List, Mapping, Path_, Scalar, Schema, Union, Where, dump_yaml, load_yaml, parse_scalar
from graphprune.solvers import METHODS, SparsitySpec, get_solver

log = logging.getLogger(__name__)

VERSION = 1


# ---------------------------------------------------------------------------- checks
def _check_sparsity(value: float) -> None:
    SparsitySpec(value)  # the one place that knows the valid range


def _check_pattern(value: str) -> None:
    SparsitySpec.parse(None if ":" in value else 0.5, value)


def _check_prune(section: dict[str, Any]) -> None:
    if section["sparsity"] is not None or section["pattern"].strip().lower() != "unstructured":
        SparsitySpec.parse(section["sparsity"], section["pattern"])  # e.g. 2:4 with sparsity 0.3


def _check_recipe(data: dict[str, Any]) -> None:
    """Checks across sections: something to do, and the job's own rules (rotation and slicing)."""
    prune = data["prune"]
    if prune["sparsity"] is None and prune["pattern"].strip().lower() == "unstructured" and not (data.get("rotate") or data.get("slice")):
        raise Invalid("unstructured pruning needs 'sparsity' (a fraction in [0, 1)); or set an N:M 'pattern'.", key="prune")
    _job_from(data).rotation_source()


def _check_slice(value: float) -> None:
    from graphprune.passes.slice import sliced_width

    sliced_width(64, value)  # the one place that knows the valid range


def _check_override(pattern: str, value: Any) -> None:
    parse_rules({pattern: value}, SparsitySpec(0.0))


def _check_relative(value: str) -> None:
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"{value!r} must be a file name inside the output folder (relative, no '..').")


def _check_sparse_init(value: Any) -> None:
    if isinstance(value, str) and value not in ("auto", "coo", "bitmask"):
        raise ValueError(f"expected true, false, 'auto', 'coo' or 'bitmask', got {value!r}.")


def _positive(default: Any, doc: str, minimum: float = 1) -> Scalar:
    return Scalar((int,), default, doc, minimum=minimum)


# ---------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class Section:
    """A top-level recipe key.

    Attributes:
        name: the key.
        schema: what its value must look like.
        to_job: validated value -> :class:`PruneJob` keyword arguments.
        from_job: a PruneJob -> this section's value (for ``Recipe.from_job``); None: not in jobs.
        run: a step run after pruning: ``run(ctx, value)`` with ``ctx`` a :class:`StepContext`;
            its return value goes to ``report["steps"][name]``. Skipped when the value is null.
    """

    name: str
    schema: Schema
    to_job: Callable[[Any], dict[str, Any]] | None = None
    from_job: Callable[[PruneJob], Any] | None = None
    run: Callable[["StepContext", Any], Any] | None = None


@dataclass
class StepContext:
    """What a step sees: the staging output folder, the pruning outcome, earlier steps' results."""

    folder: Path
    outcome: PruneOutcome
    job: PruneJob
    progress: bool = True
    results: dict[str, Any] = field(default_factory=dict)


SECTIONS: dict[str, Section] = {}


def register_section(section: Section, *, before: str | None = None) -> None:
    """Add (or replace) a section; ``before`` places it ahead of an existing one (steps run in this order)."""
    items = [(k, v) for k, v in SECTIONS.items() if k != section.name]
    at = next((i for i, (k, _) in enumerate(items) if k == before), len(items))
    items.insert(at, (section.name, section))
    SECTIONS.clear()
    SECTIONS.update(items)


def recipe_schema() -> Mapping:
    """The whole recipe's schema, built from the registered sections."""
    return Mapping({name: s.schema for name, s in SECTIONS.items()}, check=_check_recipe, doc="a graphprune recipe")


def _job_from(data: dict[str, Any]) -> PruneJob:
    kwargs: dict[str, Any] = {}
    for name, section in SECTIONS.items():
        if section.to_job is not None:
            kwargs.update(section.to_job(data[name]))
    return PruneJob(**kwargs)


CALIBRATION = Mapping(
    {
        "samples": _positive(64, "calibration sequences"),
        "length": _positive(512, "tokens per sequence", minimum=2),
        "seed": Scalar((int,), 0, "seed of the sampling offsets (and of the tiny test models)"),
        "batch_size": _positive(8, "sequences per forward pass"),
    },
    default=dict,
    doc="calibration segments of the text",
)

PRUNE = Mapping(
    {
        "method": Scalar((str,), "sparsegpt", "solver: " + ", ".join(METHODS), check=get_solver),
        "sparsity": Scalar((float,), None, "fraction of zeros in [0, 1) (unstructured)", nullable=True, check=_check_sparsity),
        "pattern": Scalar((str,), "unstructured", "'unstructured' or 'N:M' (N kept of every M inputs)", check=_check_pattern),
        "overrides": Dict(Scalar((float, str), doc="", nullable=True), doc="per-layer glob -> sparsity, 'N:M' or skip (first match wins)", check_key=_check_override),
        "options": Dict(Scalar((bool, int, float, str), nullable=True), doc="solver options, e.g. blocksize: 64"),
        "refine": Mapping(
            {"method": Scalar((str,), "masked-gd", "post-step", choices=("masked-gd",)), "steps": _positive(20, "gradient steps")},
            default=None,
            nullable=True,
            shorthand={},
            doc="masked gradient steps after the solver (null: none)",
        ),
    },
    default=dict,
    check=_check_prune,
    doc="the solver, its target and per-layer overrides",
)

ROTATE = Mapping(
    {
        "method": Scalar((str,), doc="pca (SliceGPT), hadamard (random Hadamard) or learned (RotPruner)", choices=("pca", "hadamard", "learned")),
        "options": Dict(Scalar((bool, int, float, str)), doc="learned rotation: init, steps, lr, momentum, blocks_per_step"),
        "samples": Scalar((int,), None, "calibration sequences for the rotation statistics (null: all)", nullable=True, minimum=1),
    },
    default=None,
    nullable=True,
    doc="fold the norms and rotate the residual stream before pruning",
)

OUTPUT = Mapping(
    {
        "dir": Scalar((str,), None, "output model folder (default out/<model>-<method>-<sparsity>)", nullable=True),
        "overwrite": Scalar((bool,), False, "replace an existing folder (and discard an interrupted run's checkpoint)"),
        "checkpoint": Scalar((bool,), True, "checkpoint after each block stage so --resume can continue a killed run"),
        "checkpoint_dir": Scalar((str,), None, "checkpoint folder (default <dir>.ckpt)", nullable=True),
        "lazy": Scalar((bool,), False, "stream the model folder block by block and write each block as it finishes (bounded memory)"),
    },
    default=dict,
    doc="where the model folder goes",
)

EXPORT = Mapping(
    {
        "onnx": Mapping(
            {
                "path": Scalar((str,), "model.onnx", "file inside the output folder", check=_check_relative),
                "check": Scalar((bool,), True, "compare onnxruntime with PyTorch"),
                "atol": Scalar((float,), 1e-4, "largest accepted |Δlogits|", minimum=0),
                "sparse_initializers": Scalar((bool, str), False, "store mostly-zero weights compactly: true, 'coo' or 'bitmask'", check=_check_sparse_init),
                "optimize": Scalar((bool,), True, "run the ONNX graph optimizer"),
            },
            default=None,
            nullable=True,
            shorthand={},
            doc="an ONNX file checked in onnxruntime (true: defaults)",
        ),
        "torchscript": Mapping(
            {
                "path": Scalar((str,), "model.pt", "file inside the output folder", check=_check_relative),
                "check": Scalar((bool,), True, "load in a fresh process and compare with PyTorch"),
                "atol": Scalar((float,), 1e-4, "largest accepted |Δlogits|", minimum=0),
            },
            default=None,
            nullable=True,
            shorthand={},
            doc="a TorchScript file checked in a fresh process (true: defaults)",
        ),
    },
    default=None,
    nullable=True,
    doc="exported files written into the output folder",
)

CASE = Union(
    [
        Scalar((str,), doc="a protocol case", choices=tuple(c.name for c in PROTOCOL_CASES)),
        Mapping({"name": Scalar((str,)), "batch": _positive(MISSING, "sequences"), "seq": _positive(MISSING, "tokens")}),
    ]
)

BENCH = Mapping(
    {
        "runtimes": List(Scalar((str,), choices=RUNTIMES), default=lambda: ["eager"], doc="runtimes to time in", single=True, min_items=1),
        "cases": List(CASE, default=lambda: ["prefill", "step"], doc="protocol case names or {name, batch, seq}", single=True, min_items=1),
        "repeats": _positive(10, "timed runs per target, runtime and case"),
        "warmup": _positive(2, "untimed runs before them", minimum=0),
        "threads": Scalar((int,), None, "intra-op threads (default: unchanged)", nullable=True, minimum=1),
        "dense": Scalar((bool,), True, "also time the unpruned model (the baseline of the speedups)"),
        "path": Scalar((str,), "bench.json", "results (JSON) inside the output folder", check=_check_relative),
        "markdown": Scalar((str,), "bench.md", "table inside the output folder (null: none)", nullable=True, check=_check_relative),
    },
    default=None,
    nullable=True,
    shorthand={},
    doc="latency of the pruned model (and the dense one) in the chosen runtimes",
)

EVAL = Mapping(
    {"length": _positive(512, "window length in tokens", minimum=2)},
    default=None,
    nullable=True,
    shorthand={},
    doc="perplexity per the protocol after pruning (true: default settings)",
)


def _prune_to_job(p: dict[str, Any]) -> dict[str, Any]:
    refine = p["refine"]
    return {
        "method": p["method"],
        "sparsity": p["sparsity"],
        "pattern": p["pattern"],
        "overrides": dict(p["overrides"]),
        "options": dict(p["options"]),
        "refine_steps": refine["steps"] if refine else 0,
    }


def _prune_from_job(j: PruneJob) -> dict[str, Any]:
    refine = {"method": "masked-gd", "steps": j.refine_steps} if j.refine_steps > 0 else None
    return {"method": j.method, "sparsity": j.sparsity, "pattern": j.pattern, "overrides": dict(j.overrides), "options": dict(j.options), "refine": refine}


def _run_export(ctx: StepContext, cfg: dict[str, Any]) -> dict[str, Any]:
    from graphprune import exporters

    chosen = [(fmt, c) for fmt, c in cfg.items() if c is not None]
    results: dict[str, Any] = {}
    for fmt, c in tqdm(chosen, desc="export", unit="file", disable=not ctx.progress):
        fn = getattr(exporters, f"export_{fmt}", None)
        if fn is None:
            raise RecipeError(f"export.{fmt}: this build of graphprune has no {fmt} exporter.")
        kwargs = {k: v for k, v in c.items() if k != "path"}
        rep = fn(ctx.outcome.loaded.model, ctx.folder / c["path"], **kwargs)
        info = rep.to_dict()
        info["path"] = c["path"]  # relative: the staging folder is renamed afterwards
        info.pop("external_data", None)
        results[fmt] = info
        log.info("exported %s to %s", fmt, c["path"])
    return results


def _run_bench(ctx: StepContext, cfg: dict[str, Any]) -> dict[str, Any]:
    from graphprune import bench
    from graphprune.models import load_model

    if not hasattr(bench, "bench_latency"):
        raise RecipeError("bench: this build of graphprune has no latency harness.")
    named = {c.name: c for c in PROTOCOL_CASES}
    cases = [named[c] if isinstance(c, str) else bench.Case(c["name"], c["batch"], c["seq"]) for c in cfg["cases"]]
    files = ctx.results.get("export", {})
    pruned = bench.BenchTarget(
        "pruned",
        model=ctx.outcome.loaded.model,
        onnx=ctx.folder / files["onnx"]["path"] if "onnx" in files else None,
        torchscript=ctx.folder / files["torchscript"]["path"] if "torchscript" in files else None,
    )
    targets = [pruned]
    if cfg["dense"]:
        job = ctx.job
        dense = load_model(job.model, trust_remote_code=job.trust_remote_code, seed=job.seed)
        targets.insert(0, bench.BenchTarget("dense", model=dense.model))
    result = bench.bench_latency(
        targets, cfg["runtimes"], cases, repeats=cfg["repeats"], warmup=cfg["warmup"], threads=cfg["threads"], seed=ctx.job.seed, progress=ctx.progress
    )
    bench.write_json(result, ctx.folder / cfg["path"])
    if cfg["markdown"]:
        bench.write_markdown(result, ctx.folder / cfg["markdown"])
    return {"path": cfg["path"], "markdown": cfg["markdown"], "records": len(result.records)}


for _section in (
    Section("version", Scalar((int,), VERSION, "recipe format version", choices=(VERSION,))),
    Section("model", Scalar((str,), doc="smollm2-135m, tiny-llama, tiny-opt, a Hugging Face folder or a .gguf file"), lambda v: {"model": v}, lambda j: j.model),
    Section("trust_remote_code", Scalar((bool,), False, "allow a model folder's own Python code"), lambda v: {"trust_remote_code": v}, lambda j: j.trust_remote_code),
    Section("text", List(Scalar((str,)), doc="UTF-8 text files (default: the built-in text)", single=True), lambda v: {"text": tuple(v)}, lambda j: list(j.text)),
    Section(
        "calibration",
        CALIBRATION,
        lambda c: {"calib_samples": c["samples"], "calib_len": c["length"], "seed": c["seed"], "batch_size": c["batch_size"]},
        lambda j: {"samples": j.calib_samples, "length": j.calib_len, "seed": j.seed, "batch_size": j.batch_size},
    ),
    Section(
        "rotate",
        ROTATE,
        lambda r: {"rotation": r["method"], "rotation_options": dict(r["options"]), "rotation_samples": r["samples"]} if r else {},
        lambda j: {"method": j.rotation, "options": dict(j.rotation_options), "samples": j.rotation_samples} if j.rotation else None,
    ),
    Section(
        "slice",
        Scalar((float,), 0.0, "fraction of the rotated stream to drop (SliceGPT; implies rotate pca)", check=_check_slice),
        lambda v: {"slicing": v} if v else {},
        lambda j: j.slicing,
    ),
    Section("prune", PRUNE, _prune_to_job, _prune_from_job),
    Section(
        "eval",
        EVAL,
        lambda e: {"evaluate": e is not None, "eval_len": e["length"] if e else 512},
        lambda j: {"length": j.eval_len} if j.evaluate else None,
    ),
    Section(
        "output",
        OUTPUT,
        lambda o: {"out": o["dir"], "overwrite": o["overwrite"], "checkpoint": o["checkpoint"], "checkpoint_dir": o["checkpoint_dir"], "lazy": o["lazy"]},
        lambda j: {"dir": j.out, "overwrite": j.overwrite, "checkpoint": j.checkpoint, "checkpoint_dir": j.checkpoint_dir, "lazy": j.lazy},
    ),
    Section("export", EXPORT, run=_run_export),
    Section("bench", BENCH, run=_run_bench),
):
    register_section(_section)


# ---------------------------------------------------------------------------- recipes
def _set(raw: dict[str, Any], path: Path_, value: Any) -> None:
    node = raw
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def apply_settings(raw: Any, settings: MappingT[str, Any], where: Where) -> Any:
    """Set dotted keys (``{"prune.sparsity": 0.6}``) in a raw recipe; errors will name ``--set KEY``."""
    if not isinstance(raw, dict):
        return raw  # validation reports that the document is not a mapping
    data = copy.deepcopy(raw)
    for key, value in settings.items():
        path = tuple(key.split("."))
        if not all(path):
            raise RecipeError(f"--set {key}: a key looks like section.name, e.g. prune.sparsity.")
        _set(data, path, value)
        where.labels[path] = f"--set {key}={value}"
    return data


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["prune.sparsity=0.6", "eval=true"]`` -> ``{"prune.sparsity": 0.6, "eval": True}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r} must look like KEY=VALUE, e.g. prune.sparsity=0.6.")
        out[key.strip()] = parse_scalar(value)
    return out


@dataclass
class Recipe:
    """A validated recipe: ``data`` holds every section with its defaults filled in."""

    data: dict[str, Any]
    source: str = field(default="<recipe>", compare=False)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>", where: Where | None = None, settings: MappingT[str, Any] | None = None) -> "Recipe":
        where = where or Where(source)
        if raw is None:
            raise RecipeError(f"{source}: the recipe is empty; it needs at least 'model' and a 'prune' target.")
        if settings:
            raw = apply_settings(raw, settings, where)
        return cls(recipe_schema().validate(raw, (), where), source)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>", settings: MappingT[str, Any] | None = None) -> "Recipe":
        raw, where = load_yaml(text, source)
        return cls.from_dict(raw, source, where, settings)

    @classmethod
    def load(cls, path: str | Path, settings: MappingT[str, Any] | None = None) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe {p} does not exist.")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe {p} is not UTF-8 text ({exc}).") from exc
        return cls.from_yaml(text, str(p), settings)

    @classmethod
    def from_job(cls, job: PruneJob, **steps: Any) -> "Recipe":
        """The recipe of a Python pipeline job, plus step sections (``export=..., bench=...``)."""
        raw = {name: s.from_job(job) for name, s in SECTIONS.items() if s.from_job is not None}
        raw.update(steps)
        recipe = cls.from_dict(raw, "<PruneJob>")
        back, wanted = asdict(recipe.to_job()), asdict(job)
        ignored = {"resume"} | (set() if job.evaluate else {"eval_len"})  # run-time flag; unused setting
        lost = sorted(k for k in wanted if k not in ignored and back.get(k) != wanted[k])
        if lost:
            raise RecipeError(f"the recipe schema cannot express PruneJob field(s) {lost}; register a section for them.")
        return recipe

    # ------------------------------------------------------------------ writing
    def to_yaml(self) -> str:
        return dump_yaml(self.data)

    def to_job(self) -> PruneJob:
        return _job_from(self.data)

    def with_settings(self, settings: MappingT[str, Any]) -> "Recipe":
        return Recipe.from_dict(self.data, self.source, Where(self.source), settings)


def run_recipe(
    recipe: Recipe,
    *,
    progress: bool = True,
    resume: bool = False,
    on_stage: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> PruneOutcome:
    """Run a recipe: prune (and evaluate), then its steps in the staging output folder.

    Returns the outcome; ``outcome.report["steps"]`` holds each step's result and
    ``outcome.report["out"]`` the folder written.
    """
    job = recipe.to_job()
    job.resume = resume
    if job.out is None:
        job.out = str(job.default_out_dir())
    steps = [(name, s) for name, s in SECTIONS.items() if s.run is not None and recipe.data.get(name) is not None]

    def finish(folder: Path, outcome: PruneOutcome) -> None:
        ctx = StepContext(folder, outcome, job, progress)
        for name, section in steps:
            ctx.results[name] = section.run(ctx, recipe.data[name])  # type: ignore[misc]
        outcome.report["steps"] = ctx.results

    outcome = run_prune(job, progress=progress, on_stage=on_stage, finish=finish if steps else None)
    outcome.report["out"] = job.out
    return outcome
