"""YAML recipes: a whole pipeline in one file, validated by a strict pydantic schema.

A recipe is a mapping of *sections* (:class:`Recipe`, a pydantic model; the sections are in
:mod:`graphprune.recipes.sections`). Most sections fill a :class:`PruneJob` (the Python pipeline
behind ``graphprune prune``); ``export`` and ``bench`` become *steps*
(:mod:`graphprune.pipeline.steps`) that run after pruning inside the output folder's staging
copy. This module only turns YAML into jobs and back; :func:`graphprune.pipeline.steps.run_pipeline`
runs them. Example (``recipes/wanda-2of4.yaml``)::

    model: smollm2-135m
    calibration: {samples: 64, length: 512, seed: 0}
    prune:
      method: wanda
      pattern: "2:4"
      overrides: {"*.down_proj": skip}
    eval: true
    output: {dir: out/wanda-2of4}

Round trips: ``Recipe.from_job(job).to_job() == job``, ``Recipe.from_yaml(r.to_yaml()) == r`` and
``Recipe.from_pipeline(r.to_pipeline()) == r``. A new section is a field of a :class:`Recipe`
subclass (see docs/RECIPES.md).
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence, TypeVar

from pydantic import Field, model_validator

from graphprune.errors import RecipeError
from graphprune.passes.slice import sliced_width
from graphprune.pipeline.jobs import PruneJob
from graphprune.pipeline.steps import BenchStep, ExportStep, PipelineJob, Step
from graphprune.recipes.sections import Bench, Calibration, Eval, Export, Output, Prune, Rotate, Structured
from graphprune.recipes.validation import Blame, OneOrMore, OnOff, RecipeModel, blame, checked, not_one_of, validate
from graphprune.recipes.yaml_lines import KeyPath, Where, dump_yaml, load_yaml, parse_scalar

VERSION = 1
R = TypeVar("R", bound="Recipe")


def _check_slice(fraction: float) -> None:
    sliced_width(64, fraction)  # the one place that knows the valid range


def _check_version(version: int) -> None:
    if version != VERSION:  # an int field, not Literal[1]: that one would take `true` (== 1)
        raise ValueError(not_one_of(version, [VERSION]))


class Recipe(RecipeModel):
    """A validated recipe; every section has its defaults filled in. Immutable: see :meth:`with_settings`."""

    version: Annotated[int, checked(_check_version)] = Field(VERSION, description="recipe format version")
    model: str = Field(description="smollm2-135m, tiny-llama, tiny-opt, a Hugging Face folder or a .gguf file")
    trust_remote_code: bool = Field(False, description="allow a model folder's own Python code")
    text: Annotated[list[str], OneOrMore] = Field(
        default_factory=list, description="calibration texts: UTF-8 files or built-in names pydoc, news (default: pydoc)"
    )
    calibration: Calibration = Field(default_factory=Calibration, description="calibration segments of the text")
    rotate: Rotate | None = Field(None, description="fold the norms and rotate the residual stream before pruning")
    slice: Annotated[float, checked(_check_slice)] = Field(0.0, description="fraction of the rotated stream to drop (SliceGPT; implies rotate pca)")
    structured: Structured | None = Field(None, description="remove whole MLP channels and attention heads first (fraction, method, budget, units)")
    prune: Prune = Field(default_factory=Prune, description="the solver, its target and per-layer overrides")
    eval: Annotated[Eval | None, OnOff] = Field(None, description="perplexity per the protocol after pruning (true: default settings)")
    output: Output = Field(default_factory=Output, description="where the model folder goes")
    export: Export | None = Field(None, description="exported files written into the output folder")
    bench: Annotated[Bench | None, OnOff] = Field(None, description="latency of the pruned model (and the dense one) in the chosen runtimes")

    @model_validator(mode="after")
    def _check_job(self) -> Recipe:
        """Checks across sections: something to do, and the job's own rules (rotation and slicing)."""
        if self.prune.sparsity is None and self.prune.unstructured() and not (self.rotate or self.slice or self.structured):
            raise Blame("unstructured pruning needs 'sparsity' (a fraction in [0, 1)); or set an N:M 'pattern'.", key="prune")
        with blame():
            self.to_job().rotation_source()
        return self

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls: type[R], raw: Any, source: str = "<dict>", where: Where | None = None, settings: Mapping[str, Any] | None = None) -> R:
        """Validate a parsed document; errors name ``source`` and, given ``where``, the line of the key."""
        where = where or Where(source)
        if raw is None:
            raise RecipeError(f"{source}: the recipe is empty; it needs at least 'model' and a 'prune' target.")
        if settings:
            raw = apply_settings(raw, settings, where)
        return validate(cls, raw, where)

    @classmethod
    def from_yaml(cls: type[R], text: str, source: str = "<string>", settings: Mapping[str, Any] | None = None) -> R:
        raw, where = load_yaml(text, source)
        return cls.from_dict(raw, source, where, settings)

    @classmethod
    def load(cls: type[R], path: str | Path, settings: Mapping[str, Any] | None = None) -> R:
        """Read a recipe file; ``settings`` are ``--set`` overrides (``{"prune.sparsity": 0.6}``)."""
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe {p} does not exist.")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe {p} is not UTF-8 text ({exc}).") from exc
        return cls.from_yaml(text, str(p), settings)

    def with_settings(self: R, settings: Mapping[str, Any]) -> R:
        """A copy with dotted keys set (validated again)."""
        return type(self).from_dict(self.model_dump(), "<recipe>", settings=settings)

    # ------------------------------------------------------------------ writing
    def to_yaml(self) -> str:
        """The recipe with every default, as YAML that reads back to an equal recipe."""
        return dump_yaml(self.model_dump())

    # ------------------------------------------------------------------ jobs
    def job_fields(self) -> dict[str, Any]:
        """The :class:`PruneJob` keyword arguments this recipe sets (a subclass adding a job option extends this)."""
        c, p, o = self.calibration, self.prune, self.output
        fields: dict[str, Any] = {
            "model": self.model,
            "trust_remote_code": self.trust_remote_code,
            "text": tuple(self.text),
            "calib_samples": c.samples,
            "calib_len": c.length,
            "seed": c.seed,
            "batch_size": c.batch_size,
            "calib_dtype": c.dtype,
            "text_weights": tuple(c.text_weights),
            "method": p.method,
            "sparsity": p.sparsity,
            "pattern": p.pattern,
            "overrides": dict(p.overrides),
            "options": dict(p.options),
            "refine_steps": p.refine.steps if p.refine is not None else 0,
            "layer_errors": p.layer_errors,
            "evaluate": self.eval is not None,
            "out": o.dir,
            "overwrite": o.overwrite,
            "checkpoint": o.checkpoint,
            "checkpoint_dir": o.checkpoint_dir,
            "lazy": o.lazy,
        }
        if self.eval is not None:
            fields["eval_len"] = self.eval.length
            fields["eval_text"] = tuple(self.eval.texts)
            fields["eval_windows"] = self.eval.windows
        if self.rotate is not None:
            fields.update(rotation=self.rotate.method, rotation_options=dict(self.rotate.options), rotation_samples=self.rotate.samples)
        if self.slice:
            fields["slicing"] = self.slice
        if self.structured is not None:
            fields.update(
                structured=self.structured.fraction, structured_method=self.structured.method, structured_budget=self.structured.budget,
                structured_units=self.structured.units,
            )
        return fields

    @classmethod
    def job_sections(cls, job: PruneJob) -> dict[str, Any]:
        """The sections that describe ``job`` (the inverse of :meth:`job_fields`), as plain data."""
        refine = {"method": "masked-gd", "steps": job.refine_steps} if job.refine_steps > 0 else None
        rotate = {"method": job.rotation, "options": dict(job.rotation_options), "samples": job.rotation_samples} if job.rotation else None
        return {
            "model": job.model,
            "trust_remote_code": job.trust_remote_code,
            "text": list(job.text),
            "calibration": {
                "samples": job.calib_samples, "length": job.calib_len, "seed": job.seed, "batch_size": job.batch_size,
                "dtype": job.calib_dtype, "text_weights": list(job.text_weights),
            },
            "rotate": rotate,
            "slice": job.slicing,
            "structured": (
                {"fraction": job.structured, "method": job.structured_method, "budget": job.structured_budget, "units": job.structured_units}
                if job.structured
                else None
            ),
            "prune": {
                "method": job.method, "sparsity": job.sparsity, "pattern": job.pattern, "overrides": dict(job.overrides),
                "options": dict(job.options), "refine": refine, "layer_errors": job.layer_errors,
            },
            "eval": {"length": job.eval_len, "texts": list(job.eval_text), "windows": job.eval_windows} if job.evaluate else None,
            "output": {"dir": job.out, "overwrite": job.overwrite, "checkpoint": job.checkpoint, "checkpoint_dir": job.checkpoint_dir, "lazy": job.lazy},
        }

    def to_job(self) -> PruneJob:
        return PruneJob(**self.job_fields())

    def steps(self) -> list[Step]:
        """The steps after pruning, in the order they run (export first: bench times the exported files)."""
        steps: list[Step] = []
        if self.export is not None:
            steps.append(self.export.to_step())
        if self.bench is not None:
            steps.append(self.bench.to_step())
        return steps

    @classmethod
    def step_sections(cls, steps: Sequence[Step]) -> dict[str, Any]:
        """The sections that describe ``steps`` (the inverse of :meth:`steps`)."""
        sections: dict[str, Any] = {}
        for step in steps:
            if isinstance(step, ExportStep):
                sections["export"] = Export.from_step(step)
            elif isinstance(step, BenchStep):
                sections["bench"] = Bench.from_step(step)
            else:
                raise RecipeError(f"the recipe schema has no section for the step {type(step).__name__} ({step.name!r}).")
        return sections

    def to_pipeline(self) -> PipelineJob:
        """What ``graphprune run`` runs: the prune job and the steps after it."""
        return PipelineJob(self.to_job(), self.steps())

    @classmethod
    def from_job(cls: type[R], job: PruneJob, **sections: Any) -> R:
        """The recipe of a Python pipeline job, plus other sections (``export=..., bench=...``: models or plain data)."""
        recipe = cls.from_dict({**cls.job_sections(job), **sections}, "<PruneJob>")
        back, wanted = asdict(recipe.to_job()), asdict(job)
        ignored = {"resume"} | (set() if job.evaluate else {"eval_len", "eval_text", "eval_windows"})  # a run-time flag; an unused setting
        lost = sorted(k for k in wanted if k not in ignored and back[k] != wanted[k])
        if lost:
            raise RecipeError(f"the recipe schema cannot express PruneJob field(s) {lost}; add a section for them (docs/RECIPES.md).")
        return recipe

    @classmethod
    def from_pipeline(cls: type[R], job: PipelineJob) -> R:
        """The recipe of a pipeline job: its prune job and its steps."""
        recipe = cls.from_job(job.prune, **cls.step_sections(job.steps))
        if recipe.steps() != list(job.steps):
            raise RecipeError(f"a recipe runs its steps as {[s.name for s in recipe.steps()]}, not {[s.name for s in job.steps]}.")
        return recipe


# ---------------------------------------------------------------------------- --set KEY=VALUE
def _set(raw: dict[str, Any], path: KeyPath, value: Any) -> None:
    node = raw
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}  # also replaces a shorthand such as `eval: true`
        node = node[key]
    node[path[-1]] = value


def apply_settings(raw: Any, settings: Mapping[str, Any], where: Where) -> Any:
    """Set dotted keys (``{"prune.sparsity": 0.6}``) in a raw recipe; errors there will name ``--set KEY=VALUE``."""
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


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``["prune.sparsity=0.6", "eval=true"]`` -> ``{"prune.sparsity": 0.6, "eval": True}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r} must look like KEY=VALUE, e.g. prune.sparsity=0.6.")
        out[key.strip()] = parse_scalar(value)
    return out

