"""The jobs of the driver layer: typed descriptions of what ``graphprune`` runs.

A job holds settings only; :mod:`graphprune.pipeline.prune` and
:mod:`graphprune.pipeline.export_bench` run them. Recipes (:mod:`graphprune.recipes`) turn
YAML into these jobs and back; the CLI fills them from its flags.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from graphprune.bench.latency import CASE_GROUPS, DEFAULT_RUNTIMES, RUNTIMES, Case
from graphprune.errors import ConfigError, ExportError, ModelLoadError
from graphprune.kernels.regime import KERNEL_MODES
from graphprune.models import DEFAULT_MODEL
from graphprune.models.zoo import ALL_TINY as TINY_MODELS
from graphprune.solvers import SparsitySpec

FORMATS = ("onnx", "torchscript")
PURPOSES = ("logits", "generation")
#: the cases ``graphprune bench`` times unless told otherwise
DEFAULT_CASES = ("prefill", "ttft", "decode")
_CUSTOM_CASE = re.compile(r"^([A-Za-z_][\w-]*)=(\d+)x(\d+)$")


def check_model_spec(spec: str) -> None:
    """Fail fast (before loading anything) on a model that is neither built in nor on disk."""
    if spec.strip().lower() in {DEFAULT_MODEL, "default", *TINY_MODELS}:
        return
    if not Path(spec).expanduser().exists():
        raise ModelLoadError(
            f"model {spec!r} not found: give a model folder (e.g. one written by `graphprune prune --out`), "
            f"a .gguf file, {DEFAULT_MODEL}, or a tiny test model ({', '.join(sorted(TINY_MODELS))})."
        )


def check_eval_windows(windows: int | None) -> None:
    """``--eval-windows``: a positive count, or None for every window (the protocol)."""
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int) or windows < 1):
        raise ConfigError(f"--eval-windows takes a positive number of windows per text, got {windows!r}; omit it to score every window (the protocol).")


@dataclass
class EvalJob:
    """Everything ``graphprune eval`` needs."""

    model: str = DEFAULT_MODEL
    text: Sequence[str] = ()  # texts to evaluate on: files or built-in names (default: pydoc and news)
    eval_len: int = 512
    batch_size: int = 4
    trust_remote_code: bool = False
    eval_windows: int | None = None  # score only the first N windows of each text (a quick check, not the protocol figure)
    #: for an exported file (``.onnx``, ``.pt``): where its tokenizer is (a folder with
    #: tokenizer files, or a model ``load_model`` takes); default the file's own folder
    tokenizer: str | None = None


@dataclass
class PruneJob:
    """Everything ``graphprune prune`` needs (also what a recipe's prune step holds)."""

    model: str = DEFAULT_MODEL
    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str = "unstructured"
    overrides: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    refine_steps: int = 0
    layer_errors: bool = False  # report every Linear's reconstruction error even for solvers that need no XᵀX (costs its accumulation)
    calib_samples: int = 64
    calib_len: int = 512
    seed: int = 0
    batch_size: int = 8
    calib_dtype: str = "float32"  # dtype of the block stages' calibration forwards: float32 or bfloat16 (autocast)
    text: Sequence[str] = ()  # calibration texts: files or built-in names (default: the protocol text, pydoc)
    text_weights: Sequence[float] = ()  # share of the calibration segments per text (default: equal shares)
    out: str | None = None
    overwrite: bool = False
    evaluate: bool = False
    eval_len: int = 512
    eval_text: Sequence[str] = ()  # texts to evaluate on (default: the --text files, else pydoc and news)
    eval_windows: int | None = None  # score only the first N windows of each text (a quick check, not the protocol figure)
    trust_remote_code: bool = False
    checkpoint: bool = True  # save each finished stage (in checkpoint_dir or <out>.ckpt) until the output is written
    checkpoint_dir: str | None = None
    resume: bool = False  # continue from the checkpoint of an interrupted run of the same job
    rotation: str | None = None  # rotate the residual stream first: None, "pca", "hadamard" or "learned"
    slicing: float = 0.0  # fraction of the rotated stream to drop (SliceGPT); implies rotation "pca"
    rotation_options: dict[str, Any] = field(default_factory=dict)  # learned: init, steps, lr, momentum, blocks_per_step, holdout, check_every, patience
    rotation_samples: int | None = None  # calibration sequences for the rotation statistics (None: all)
    lazy: bool = False  # stream: materialise one block at a time from the folder's safetensors, write each when done
    structured: float = 0.0  # fraction of the decoder blocks' Linear parameters to remove as whole structures
    structured_method: str = "obs"  # obs, obs-swap, wanda-sp, flap (graphprune.solvers.structured)
    structured_budget: str = "uniform"  # uniform (same width in every block) or adaptive (one global budget)
    structured_units: str = "mlp"  # mlp, heads, kv-groups, mlp+heads, mlp+kv-groups (graphprune.passes.structured.UNITS)

    def spec(self) -> SparsitySpec:
        return SparsitySpec.parse(self.sparsity, self.pattern)

    def prunes(self) -> bool:
        """False for a rotate/slice/structured-only job (no sparsity and no N:M pattern given)."""
        return not (
            self.sparsity is None and self.pattern.strip().lower() == "unstructured" and bool(self.rotation or self.slicing or self.structured)
        )

    def check_texts(self) -> None:
        """Validate the text settings (files or built-in names, one weight per text) before anything is loaded."""
        from graphprune.data import BUILTIN_TEXTS, calibration_shares, unknown_text_message

        specs = list(self.text) + (list(self.eval_text) if self.evaluate else [])
        check_eval_windows(self.eval_windows)
        for spec in specs:
            if not Path(spec).is_file() and str(spec) not in BUILTIN_TEXTS:
                raise ConfigError(unknown_text_message(spec))
        if self.text_weights:
            count = len(self.text) or 1
            if len(self.text_weights) != count:
                raise ConfigError(f"--text-weights gives {len(self.text_weights)} weights for {count} calibration texts; give one weight per --text entry.")
            calibration_shares(self.calib_samples, list(self.text_weights))

    def check_structured(self) -> None:
        """Validate the structured-pruning fields (fraction, method) before anything is loaded."""
        if not self.structured:
            return
        from graphprune.solvers.structured import get_structured

        if not (0.0 < self.structured < 1.0):
            raise ConfigError(f"--structured is a fraction of the block parameters in (0, 1), got {self.structured}; e.g. --structured 0.2.")
        get_structured(self.structured_method)
        from graphprune.passes.structured import parse_units

        parse_units(self.structured_units)
        if self.structured_budget not in ("uniform", "adaptive"):
            raise ConfigError(f"--structured-budget is uniform or adaptive, got {self.structured_budget!r}.")
        if self.lazy:
            raise ConfigError("structured pruning changes the model's shapes while it runs; run it without --lazy.")

    def rotation_source(self) -> str | None:
        """The rotation to apply (slicing implies PCA), validated."""
        from graphprune.passes.rotate import SOURCES
        from graphprune.passes.slice import sliced_width

        source = self.rotation or ("pca" if self.slicing else None)
        if source is not None and source not in SOURCES:
            raise ConfigError(f"unknown rotation {source!r}; choose one of: {', '.join(SOURCES)}.")
        sliced_width(64, self.slicing)  # validates the fraction
        if self.slicing and source == "hadamard":
            raise ConfigError("slicing needs a rotation ordered by importance; use --rotate pca or learned with --slice.")
        if source == "learned" and not self.prunes():
            raise ConfigError("a learned rotation is learned for a sparsity target; give --sparsity or --pattern.")
        return source

    def default_out_dir(self) -> Path:
        """``out/<model>[-<rotation>][-slice<P>]-<method>-<sparsity or N of M>``."""
        stem = Path(self.model).stem
        sl = f"-slice{int(round(self.slicing * 100))}" if self.slicing else ""
        if self.structured:
            sl += f"-struct{int(round(self.structured * 100))}-{self.structured_method}"
            sl += "-adaptive" if self.structured_budget == "adaptive" else ""
            sl += "" if self.structured_units == "mlp" else f"-{self.structured_units.replace(',', '+')}"
        if not self.prunes():
            rot = f"-{self.rotation or 'pca'}" if (self.rotation or self.slicing) else ""
            return Path("out") / f"{stem}{rot}{sl}"
        tag = self.pattern.replace(":", "of") if ":" in self.pattern else f"{int(round((self.sparsity or 0) * 100))}"
        rot = f"-{self.rotation}" if self.rotation else ""
        return Path("out") / f"{stem}{rot}{sl}-{self.method}-{tag}"


@dataclass
class ExportJob:
    """Everything ``graphprune export`` needs."""

    model: str
    format: str
    out: str
    sparse_initializers: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    #: logits of a real LM are O(10); float32 reassociation over many layers reaches ~1e-4 absolute
    atol: float = 1e-3
    #: ``"logits"``: one file, ``input_ids -> logits`` of every position; ``"generation"``: a
    #: folder with a KV-cache model file, its tokenizer and generation.json
    purpose: str = "logits"
    #: greedy tokens a generation export must reproduce from eager PyTorch
    check_tokens: int = 32
    #: ``"int8"``: onnxruntime dynamic quantization of the ONNX file's weights
    quantize: str | None = None

    def validate(self) -> None:
        """Check the job before loading anything (cheap errors first)."""
        if not self.atol > 0:
            raise ConfigError(f"--atol must be > 0, got {self.atol}.")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown export format {self.format!r}; choose from {list(FORMATS)}.")
        if self.purpose not in PURPOSES:
            raise ConfigError(f"unknown export purpose {self.purpose!r} (--for); choose from {list(PURPOSES)}.")
        if self.sparse_initializers and self.format != "onnx":
            raise ConfigError("--sparse-initializers applies to --format onnx only (TorchScript stores the weights as they are).")
        if self.check_tokens < 0:
            raise ConfigError(f"--check-tokens must be >= 0, got {self.check_tokens}.")
        from graphprune.exporters.quantize import check_quantize

        check_quantize(self.quantize, self.format)
        out = Path(self.out)
        if self.purpose == "generation":
            if out.is_file():
                raise ExportError(f"output {out} is a file; --for generation writes a folder (model file, tokenizer, generation.json): give a folder name.")
            if out.is_dir() and any(out.iterdir()) and not self.overwrite:
                raise ExportError(f"output {out} already exists; choose another --out or pass --overwrite.")
            check_model_spec(self.model)
            return
        if out.is_dir():
            raise ExportError(f"output {out} is a folder; give a file name, e.g. {out / ('model.onnx' if self.format == 'onnx' else 'model.pt')}.")
        if out.exists() and not self.overwrite:
            raise ExportError(f"output {out} already exists; choose another --out or pass --overwrite.")
        check_model_spec(self.model)


@dataclass
class GenerateJob:
    """Everything ``graphprune generate`` needs."""

    model: str
    prompts: list[str]
    max_new_tokens: int = 64
    runtime: str = "eager"
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    threads: int | None = None
    trust_remote_code: bool = False
    #: sparse kernels for eager / compile runs: ``auto`` (the folder's saved plan, else measured), ``measure``, ``off``
    kernels: str = "off"

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {self.runtime!r}; choose from {list(RUNTIMES)}.")
        if self.kernels not in KERNEL_MODES:
            raise ConfigError(f"unknown --kernels {self.kernels!r}; choose from {list(KERNEL_MODES)}.")
        if not self.prompts or any(not p for p in self.prompts):
            raise ConfigError("give a non-empty --prompt (repeat it for a batch).")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0 or self.top_k < 0:
            raise ConfigError(f"--temperature and --top-k must be >= 0, got {self.temperature} and {self.top_k}.")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}.")


def parse_cases(names: Sequence[str]) -> list[Case]:
    """Protocol cases and groups (``prefill``, ``ttft``, ``decode``, ``step-nocache``,
    ``throughput``, ``ttft-512``, ...; see :mod:`graphprune.bench.latency`) or custom
    forward cases ``NAME=BATCHxSEQ``."""
    cases: list[Case] = []
    for name in names:
        if name in CASE_GROUPS:
            cases.extend(CASE_GROUPS[name])
            continue
        m = _CUSTOM_CASE.match(name)
        if not m:
            raise ConfigError(f"unknown case {name!r}; use {sorted(CASE_GROUPS)} or NAME=BATCHxSEQ such as short=1x16.")
        batch, seq = int(m.group(2)), int(m.group(3))
        if batch < 1 or seq < 1:
            raise ConfigError(f"case {name!r} needs batch and sequence >= 1.")
        cases.append(Case(m.group(1), batch, seq))
    if len({c.name for c in cases}) != len(cases):
        raise ConfigError(f"case names must be unique, got {[c.name for c in cases]}.")
    return cases


@dataclass
class BenchJob:
    """Everything ``graphprune bench`` needs; the first target is the baseline."""

    targets: Sequence[str]
    runtimes: Sequence[str] = DEFAULT_RUNTIMES
    cases: Sequence[str] = DEFAULT_CASES
    repeats: int = 10
    warmup: int = 2
    out: str | None = "out/bench"
    threads: int | None = None
    names: Sequence[str] = ()
    trust_remote_code: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: generation export folders to time instead of exporting, by target label
    generation: dict[str, str] = field(default_factory=dict)
    #: sparse kernels of pruned models (``auto``: a folder's saved plan for this machine, else measured; ``measure``; ``off``);
    #: ONNX files are exported with them lowered to dense
    kernels: str = "off"

    def validate(self) -> list[Case]:
        if not self.targets:
            raise ConfigError("bench needs at least one model (the first is the baseline).")
        if self.kernels not in KERNEL_MODES:
            raise ConfigError(f"unknown --kernels {self.kernels!r}; choose from {list(KERNEL_MODES)}.")
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ConfigError(f"unknown runtime(s) {unknown}; choose from {list(RUNTIMES)}.")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError(f"--repeats must be >= 1 and --warmup >= 0, got {self.repeats} and {self.warmup}.")
        if self.names and len(self.names) != len(self.targets):
            raise ConfigError(f"--names gives {len(self.names)} labels for {len(self.targets)} models.")
        for t in self.targets:
            check_model_spec(t)
        if self.out is not None and Path(self.out).is_file():
            raise ConfigError(f"--out {self.out} is a file; give a folder for latency.md/.json/.png.")
        from graphprune.exporters.kv import read_description

        for label, folder in self.generation.items():
            if label not in self.labels():
                raise ConfigError(f"--generation names {label!r}, which is not one of the targets {self.labels()}.")
            read_description(folder)  # a clear error for a folder that is not a generation export
        return parse_cases(self.cases)

    def labels(self) -> list[str]:
        labels = list(self.names) if self.names else [Path(t).name or t for t in self.targets]
        seen: dict[str, int] = {}
        out = []
        for label in labels:
            seen[label] = seen.get(label, 0) + 1
            out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
        return out
