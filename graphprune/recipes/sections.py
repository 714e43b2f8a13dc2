"""The sections of a recipe, as pydantic models (see docs/RECIPES.md for the table of keys).

Each model is one mapping of the YAML format; its fields are the keys, with their types,
defaults and checks. Ranges and vocabularies are not repeated here: they come from the one
place that knows them (``SparsitySpec``, ``parse_rules``, ``get_solver``, ``sliced_width``, the
rotation sources, the runtimes and protocol cases of the latency harness, the sparse ONNX
encodings, :func:`~graphprune.pipeline.steps.check_inside`).

The step sections (``export``, ``bench``) convert to and from the typed steps of the driver
layer (:mod:`graphprune.pipeline.steps`); the others fill a ``PruneJob``, in
:class:`graphprune.recipes.recipe.Recipe`.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from graphprune.bench.latency import CASE_GROUPS, RUNTIMES, Case
from graphprune.exporters.onnx_sparse import MODES
from graphprune.passes.prune import parse_rules
from graphprune.passes.rotate import SOURCES
from graphprune.pipeline.steps import BenchStep, ExportStep, OnnxExport, TorchScriptExport, check_inside
from graphprune.recipes.validation import Either, NullIsEmpty, OneOrMore, OnOff, RecipeModel, blame, checked, not_one_of
from graphprune.solvers import METHODS, SparsitySpec, get_solver

#: single protocol cases by name (``step`` is the former name of ``step-nocache``)
PROTOCOL = {name: group[0] for name, group in CASE_GROUPS.items() if len(group) == 1}


def _check_pattern(pattern: str) -> None:
    SparsitySpec.parse(None if ":" in pattern else 0.5, pattern)  # a pattern alone; its sparsity is checked with it in Prune


# ---------------------------------------------------------------------------- the job
class Calibration(RecipeModel):
    """Calibration segments of the text."""

    samples: int = Field(64, ge=1, description="calibration sequences")
    length: int = Field(512, ge=2, description="tokens per sequence")
    seed: int = Field(0, description="seed of the sampling offsets (and of the tiny test models)")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the calibration forwards (bfloat16: autocast; statistics and solvers stay float32/float64)"
    )
    text_weights: Annotated[list[float], OneOrMore] = Field(
        default_factory=list, description="share of the segments drawn from each text (default: equal shares)"
    )


class Refine(RecipeModel):
    """Masked gradient steps after the solver."""

    method: Literal["masked-gd"] = Field("masked-gd", description="the post-step")
    steps: int = Field(20, ge=1, description="gradient steps")


Override = Annotated[float | str | None, Either("a sparsity, an 'N:M' pattern, 'skip' or null")]
Option = Annotated[bool | int | float | str | None, Either("true, false, a number, a string or null")]


class Prune(RecipeModel):
    """The solver, its target and per-layer overrides."""

    method: Annotated[str, checked(get_solver)] = Field("sparsegpt", description="solver: " + ", ".join(METHODS))
    sparsity: Annotated[float | None, checked(SparsitySpec)] = Field(None, description="fraction of zeros in [0, 1) (unstructured)")
    pattern: Annotated[str, checked(_check_pattern)] = Field("unstructured", description="'unstructured' or 'N:M' (N kept of every M inputs)")
    overrides: Annotated[dict[str, Override], NullIsEmpty] = Field(
        default_factory=dict, description="per-layer glob -> sparsity, 'N:M' or skip (first match wins)"
    )
    options: Annotated[dict[str, Option], NullIsEmpty] = Field(default_factory=dict, description="solver options, e.g. blocksize: 64")
    refine: Annotated[Refine | None, OnOff] = Field(None, description="masked gradient steps after the solver (null: none)")
    layer_errors: bool = Field(False, description="report each Linear's reconstruction error also for solvers that need no XᵀX")

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, overrides: dict[str, float | str | None]) -> dict[str, float | str | None]:
        for glob, value in overrides.items():
            with blame(glob):
                parse_rules({glob: value}, SparsitySpec(0.0))
        return overrides

    @model_validator(mode="after")
    def _check_target(self) -> Prune:
        if self.sparsity is not None or not self.unstructured():
            with blame():
                SparsitySpec.parse(self.sparsity, self.pattern)  # e.g. 2:4 with sparsity 0.3
        return self

    def unstructured(self) -> bool:
        return self.pattern.strip().lower() == "unstructured"


class Rotate(RecipeModel):
    """Fold the norms and rotate the residual stream before pruning."""

    method: Literal[SOURCES] = Field(description="pca (SliceGPT), hadamard (random Hadamard) or learned (RotPruner)")  # type: ignore[valid-type]
    options: Annotated[dict[str, Annotated[bool | int | float | str, Either("true, false, a number or a string")]], NullIsEmpty] = Field(
        default_factory=dict, description="learned rotation: init, steps, lr, momentum, blocks_per_step"
    )
    samples: int | None = Field(None, ge=1, description="calibration sequences for the rotation statistics (null: all)")


class Structured(RecipeModel):
    """Remove whole MLP channels and attention heads (with reconstruction) before any unstructured or N:M pruning."""

    fraction: float = Field(gt=0.0, lt=1.0, description="fraction of the decoder blocks' Linear parameters to remove")
    method: Literal["obs", "obs-swap", "wanda-sp", "flap"] = Field("obs", description="structured solver")
    budget: Literal["uniform", "adaptive"] = Field("uniform", description="the same MLP width in every block, or per-block widths under one budget")
    units: Literal["mlp", "heads", "kv-groups", "mlp+heads", "mlp+kv-groups"] = Field("mlp", description="what may be removed")


class Eval(RecipeModel):
    """Perplexity per the protocol after pruning."""

    length: int = Field(512, ge=2, description="window length in tokens")
    texts: Annotated[list[str], OneOrMore] = Field(
        default_factory=list, description="texts to score: files or built-in names (default: the recipe's text, else pydoc and news)"
    )
    windows: int | None = Field(
        None, ge=1, description="score only the first N windows of each text: a quick check, not the protocol figure (default: every window)"
    )


class Output(RecipeModel):
    """Where the model folder goes."""

    dir: str | None = Field(None, description="output model folder (default out/<model>-<method>-<sparsity>)")
    overwrite: bool = Field(False, description="replace an existing folder (and discard an interrupted run's checkpoint)")
    checkpoint: bool = Field(True, description="checkpoint after each block stage so --resume can continue a killed run")
    checkpoint_dir: str | None = Field(None, description="checkpoint folder (default <dir>.ckpt)")
    lazy: bool = Field(False, description="stream the model folder block by block and write each block as it finishes")


# ---------------------------------------------------------------------------- steps
FileName = Annotated[str, checked(check_inside)]
_SPARSE_INIT = "true, false, " + ", ".join(map(repr, MODES[:-1])) + f" or {MODES[-1]!r}"


class Onnx(RecipeModel):
    """An ONNX file checked in onnxruntime."""

    path: FileName = Field("model.onnx", description="file inside the output folder")
    check: bool = Field(True, description="compare onnxruntime with PyTorch")
    atol: float = Field(1e-4, ge=0, description="largest accepted |Δlogits|")
    sparse_initializers: Annotated[bool | Literal[MODES], Either(_SPARSE_INIT)] = Field(  # type: ignore[valid-type]
        False, description="store mostly-zero weights compactly: true, 'coo' or 'bitmask'"
    )
    optimize: bool = Field(True, description="run the ONNX graph optimizer")


class TorchScript(RecipeModel):
    """A TorchScript file checked in a fresh process."""

    path: FileName = Field("model.pt", description="file inside the output folder")
    check: bool = Field(True, description="load in a fresh process and compare with PyTorch")
    atol: float = Field(1e-4, ge=0, description="largest accepted |Δlogits|")


class Export(RecipeModel):
    """Exported files written into the output folder."""

    onnx: Annotated[Onnx | None, OnOff] = Field(None, description="an ONNX file checked in onnxruntime (true: defaults)")
    torchscript: Annotated[TorchScript | None, OnOff] = Field(None, description="a TorchScript file checked in a fresh process (true: defaults)")

    def to_step(self) -> ExportStep:
        onnx = OnnxExport(**self.onnx.model_dump()) if self.onnx is not None else None
        torchscript = TorchScriptExport(**self.torchscript.model_dump()) if self.torchscript is not None else None
        return ExportStep(onnx=onnx, torchscript=torchscript)

    @classmethod
    def from_step(cls, step: ExportStep) -> Export:
        onnx = Onnx.model_validate(asdict(step.onnx)) if step.onnx is not None else None
        torchscript = TorchScript.model_validate(asdict(step.torchscript)) if step.torchscript is not None else None
        return cls(onnx=onnx, torchscript=torchscript)


class BenchCase(RecipeModel):
    """An input shape: a protocol case by name (``prefill``) or ``{name, batch, seq}``; dumped the way it was written."""

    name: str = Field(description="a protocol case (prefill, step-nocache, throughput, ttft-128, ttft-512, decode-b1, decode-b8) or a label")
    batch: int | None = Field(default=None, ge=1, description="sequences")
    seq: int | None = Field(default=None, ge=1, description="tokens")

    @model_validator(mode="before")
    @classmethod
    def _by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in PROTOCOL:
                raise ValueError(not_one_of(value, PROTOCOL))
            return {"name": value}
        return value

    @model_validator(mode="after")
    def _check_shape(self) -> BenchCase:
        missing = [key for key, value in (("batch", self.batch), ("seq", self.seq)) if value is None]
        if missing and not (len(missing) == 2 and self.name in PROTOCOL):
            raise ValueError(f"missing required key {missing[0]!r}.")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> Any:
        return self.name if self.batch is None else handler(self)

    def to_case(self) -> Case:
        return PROTOCOL[self.name] if self.batch is None or self.seq is None else Case(self.name, self.batch, self.seq)

    @classmethod
    def from_case(cls, case: Case) -> BenchCase:
        return cls(name=case.name) if PROTOCOL.get(case.name) == case else cls(name=case.name, batch=case.batch, seq=case.seq)


class Bench(RecipeModel):
    """Latency of the pruned model (and the dense one) in the chosen runtimes."""

    runtimes: Annotated[list[Literal[RUNTIMES]], OneOrMore, Field(min_length=1)] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["eager"], description="runtimes to time in"
    )
    cases: Annotated[list[BenchCase], OneOrMore, Field(min_length=1)] = Field(
        default_factory=lambda: [BenchCase(name="prefill"), BenchCase(name="step-nocache")], description="protocol case names or {name, batch, seq}"
    )
    repeats: int = Field(10, ge=1, description="timed runs per target, runtime and case")
    warmup: int = Field(2, ge=0, description="untimed runs before them")
    threads: int | None = Field(None, ge=1, description="intra-op threads (default: unchanged)")
    dense: bool = Field(True, description="also time the unpruned model (the baseline of the speedups)")
    path: FileName = Field("bench.json", description="results (JSON) inside the output folder")
    markdown: Annotated[str | None, checked(check_inside)] = Field("bench.md", description="table inside the output folder (null: none)")

    def to_step(self) -> BenchStep:
        return BenchStep(
            runtimes=tuple(self.runtimes), cases=tuple(c.to_case() for c in self.cases), repeats=self.repeats, warmup=self.warmup,
            threads=self.threads, dense=self.dense, path=self.path, markdown=self.markdown,
        )

    @classmethod
    def from_step(cls, step: BenchStep) -> Bench:
        return cls(
            runtimes=list(step.runtimes), cases=[BenchCase.from_case(c) for c in step.cases], repeats=step.repeats, warmup=step.warmup,
            threads=step.threads, dense=step.dense, path=step.path, markdown=step.markdown,
        )
