"""Recipes without running a model: the example recipes, round trips with the Python
pipeline, recipe errors (each naming the key and the line), extension by new sections."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

from graphprune.bench import Case
from graphprune.cli import main
from graphprune.errors import ConfigError, RecipeError
from graphprune.pipeline import PruneJob
from graphprune.pipeline.steps import BenchStep, ExportStep, OnnxExport, PipelineJob, Step, StepContext, TorchScriptExport
from graphprune.recipes.recipe import Recipe
from graphprune.recipes.sections import Bench, Eval, Export, Rotate
from graphprune.recipes.validation import OnOff, RecipeModel, walk_fields

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "recipes").glob("*.yaml"))


def test_example_recipes_are_there() -> None:
    assert {"sparsegpt-50.yaml", "wanda-2of4.yaml", "tiny-smoke.yaml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_recipes_validate_and_round_trip(path: Path) -> None:
    r = Recipe.load(path)
    assert Recipe.from_yaml(r.to_yaml()) == r
    job = r.to_job()
    assert Recipe.from_job(job, export=r.export, bench=r.bench) == r
    assert Recipe.from_pipeline(r.to_pipeline()) == r
    job.spec()


def test_sparsegpt_50_is_the_protocol_job() -> None:
    job = Recipe.load(REPO / "recipes" / "sparsegpt-50.yaml").to_job()
    assert job == PruneJob(model="smollm2-135m", method="sparsegpt", sparsity=0.5, options={"blocksize": 128},
                           evaluate=True, out="out/smollm2-sparsegpt-50")


_globs = st.sampled_from(["*.down_proj", "*.q_proj", "model.layers.0.*", "*.layers.1[0-9].*"])
_override = st.one_of(st.floats(0, 0.95), st.sampled_from(["2:4", "4:8", "skip"]))
_jobs = st.builds(
    PruneJob,
    model=st.sampled_from(["tiny-llama", "smollm2-135m", "./some/folder", "m.gguf"]),
    method=st.sampled_from(["magnitude", "wanda", "sparsegpt"]),
    sparsity=st.one_of(st.none(), st.floats(0, 0.99)),
    pattern=st.just("unstructured"),
    overrides=st.dictionaries(_globs, _override, max_size=3),
    options=st.dictionaries(
        st.sampled_from(["blocksize", "percdamp", "note"]), st.one_of(st.integers(1, 512), st.floats(0, 1), st.text(max_size=4)), max_size=2
    ),
    refine_steps=st.integers(0, 50),
    calib_samples=st.integers(1, 128),
    calib_len=st.integers(2, 2048),
    seed=st.integers(0, 2**31),
    batch_size=st.integers(1, 16),
    calib_dtype=st.sampled_from(["float32", "bfloat16"]),
    text=st.lists(st.sampled_from(["a.txt", "b/c.txt", "2:4.txt", "yes"]), max_size=2).map(tuple),
    out=st.one_of(st.none(), st.sampled_from(["out/x", "o u t"])),
    overwrite=st.booleans(),
    evaluate=st.booleans(),
    eval_len=st.integers(2, 1024),
    trust_remote_code=st.booleans(),
    checkpoint=st.booleans(),
    checkpoint_dir=st.one_of(st.none(), st.just("ck")),
).filter(lambda j: j.sparsity is not None).map(lambda j: _fix_eval(j))


def _fix_eval(job: PruneJob) -> PruneJob:
    if not job.evaluate:
        job.eval_len = 512  # without evaluation the window length is not part of a recipe
    return job


@settings(max_examples=40, deadline=None)
@given(_jobs, st.sampled_from([None, "2:4", "4:8"]))
def test_python_pipeline_and_yaml_round_trip(job: PruneJob, nm: str | None) -> None:
    if nm is not None:
        job.pattern, job.sparsity = nm, None
    recipe = Recipe.from_job(job)
    assert recipe.to_job() == job
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.to_job() == job


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: m\nprune:\n  sparsity: 1.5\n", "r.yaml:3: prune.sparsity: sparsity must be in [0, 1), got 1.5"),
        ("model: m\nprune:\n  sparsity: -0.1\n", "r.yaml:3: prune.sparsity: sparsity must be in [0, 1)"),
        ("model: m\nprune:\n  pattern: 4:2\n", "r.yaml:3: prune.pattern: invalid N:M pattern 4:2"),
        ("model: m\nprune:\n  pattern: 2:4\n  sparsity: 0.3\n", "r.yaml:2: prune: pattern 2:4 fixes sparsity at 0.5"),
        ("model: m\nprune:\n  method: obs\n  sparsity: 0.5\n", "r.yaml:3: prune.method: unknown pruning method 'obs'"),
        ("model: m\nprune:\n  pattern: blocky\n", "r.yaml:3: prune.pattern: unknown sparsity pattern 'blocky'"),
        ("model: m\nprune: {}\n", "r.yaml:2: prune: unstructured pruning needs 'sparsity'"),
        ("model: m\nprune:\n  sparsity: 0.5\n  overides: {}\n", "r.yaml:4: prune.overides: unknown key; did you mean 'overrides'?"),
        ("model: m\nprune:\n  sparsity: 0.5\n  overrides:\n    '*.q_proj': 3:3\n", "r.yaml:5: prune.overrides['*.q_proj']: invalid N:M pattern 3:3"),
        ("model: m\nprune:\n  sparsity: 0.5\n  overrides: {'*.fc1': half}\n", "r.yaml:4: prune.overrides['*.fc1']: override for '*.fc1' must be a sparsity"),
        ("model: m\nprune: {sparsity: 0.5}\ncalibration: {length: 1}\n", "r.yaml:3: calibration.length: must be >= 2"),
        ("model: m\nprune: {sparsity: 0.5}\nexport: {onnx: {path: ../x.onnx}}\n", "r.yaml:3: export.onnx.path: '../x.onnx' must be a file name inside"),
        ("model: m\nprune: {sparsity: 0.5}\nbench: {runtimes: [tensorrt]}\n", "r.yaml:3: bench.runtimes[0]: 'tensorrt' is not allowed"),
        ("model: m\nprune: {sparsity: 0.5}\nrotat: {method: hadamard}\n", "r.yaml:3: rotat: unknown key; did you mean 'rotate'?"),
        ("model: m\nprune: {sparsity: 0.5}\nrotate: {method: qr}\n", "r.yaml:3: rotate.method: 'qr' is not allowed"),
        ("model: m\nslice: 1.0\n", "r.yaml:2: slice: slicing fraction must be in [0, 1)"),
        ("model: m\nrotate: {method: hadamard}\nslice: 0.2\n", "r.yaml: slicing needs a rotation ordered by importance"),
        ("model: m\nprune: {sparsity: 0.5}\nversion: 2\n", "r.yaml:3: version: 2 is not allowed"),
        ("prune: {sparsity: 0.5}\n", "r.yaml: missing required key 'model'"),
        ("model: m\n", "r.yaml: prune: unstructured pruning needs 'sparsity'"),
        ("", "r.yaml: the recipe is empty"),
        ("model: m\nprune: {sparsity: 0.5\n", "r.yaml:3: invalid YAML"),
    ],
)
def test_recipe_errors_name_the_key_and_line(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text, "r.yaml")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["BAD"], "bad.yaml:3: prune.sparsity: sparsity must be in [0, 1), got 2.0"),
        (["GOOD", "--set", "prune.sparsity=1.5"], "--set prune.sparsity=1.5: prune.sparsity: sparsity must be in [0, 1)"),
        (["GOOD", "--set", "prune.sparsity"], "must look like KEY=VALUE"),
        (["/no/such/recipe.yaml"], "recipe /no/such/recipe.yaml does not exist"),
        (["GOOD", "--out", "EXISTING"], "already exists; choose another --out or pass --overwrite"),
    ],
)
def test_cli_recipe_errors_are_one_line(args, message, tmp_path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("model: tiny-llama\nprune:\n  sparsity: 2.0\n")
    (tmp_path / "good.yaml").write_text("model: tiny-llama\nprune: {sparsity: 0.5}\n")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    subst = {"BAD": tmp_path / "bad.yaml", "GOOD": tmp_path / "good.yaml", "EXISTING": tmp_path / "existing"}
    assert main(["run", *[str(subst.get(a, a)) for a in args], "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "existing" / "keep.txt").read_text() == "precious"


def test_cli_check_prints_the_full_recipe(tmp_path, capsys) -> None:
    (tmp_path / "r.yaml").write_text("model: tiny-llama\nprune: {method: wanda, pattern: '2:4'}\neval: true\n")
    assert main(["run", str(tmp_path / "r.yaml"), "--check", "--set", "calibration.samples=4", "--out", "o"]) == 0
    printed = Recipe.from_yaml(capsys.readouterr().out)
    assert printed.calibration.samples == 4 and printed.output.dir == "o"
    assert printed.eval == Eval(length=512) and printed.prune.pattern == "2:4"


def test_rotate_and_slice_only_recipes() -> None:
    job = Recipe.from_yaml("model: m\nslice: 0.25\n").to_job()
    assert job.slicing == 0.25 and job.rotation is None and not job.prunes()
    job = PruneJob(model="m", rotation="learned", rotation_options={"steps": 5}, rotation_samples=8, pattern="2:4", slicing=0.1)
    assert Recipe.from_job(job).to_job() == job
    assert Recipe.from_job(job).rotate == Rotate(method="learned", options={"steps": 5}, samples=8)


def test_structured_recipes() -> None:
    """A structured section alone is a job (no sparsity needed), and it round-trips; with a
    prune target both run."""
    job = Recipe.from_yaml("model: m\nstructured: {fraction: 0.3, method: wanda-sp, budget: adaptive}\n").to_job()
    assert (job.structured, job.structured_method, job.structured_budget) == (0.3, "wanda-sp", "adaptive") and not job.prunes()
    both = PruneJob(model="m", structured=0.2, method="sparsegpt", sparsity=0.5, structured_units="mlp+heads")
    assert Recipe.from_job(both).to_job() == both and both.prunes()
    assert Recipe.from_yaml(Recipe.from_job(both).to_yaml()).to_job() == both
    with pytest.raises(RecipeError, match="structured.fraction"):
        Recipe.from_yaml("model: m\nstructured: {fraction: 1.2}\n", "r.yaml")
    with pytest.raises(RecipeError, match="structured.method"):
        Recipe.from_yaml("model: m\nstructured: {fraction: 0.2, method: osscar}\n", "r.yaml")
    with pytest.raises(RecipeError, match="structured.units"):
        Recipe.from_yaml("model: m\nstructured: {fraction: 0.2, units: experts}\n", "r.yaml")


def test_a_job_the_schema_cannot_express_is_refused() -> None:
    job = PruneJob(model="m", sparsity=0.5, rotation_options={"steps": 5})  # options without a rotation
    with pytest.raises(RecipeError, match=r"cannot express PruneJob field\(s\) \['rotation_options'\]"):
        Recipe.from_job(job)


def test_shorthands() -> None:
    r = Recipe.from_yaml("model: m\ntext: a.txt\nprune: {sparsity: 0.5, refine: true}\neval: true\nexport: {onnx: true}\nbench: true\n")
    assert r.text == ["a.txt"] and r.prune.refine is not None and r.prune.refine.steps == 20
    assert r.eval == Eval() and r.export == Export.model_validate({"onnx": {}}) and r.bench == Bench()
    assert Recipe.from_yaml("model: m\nprune: {sparsity: 0.5}\neval: false\nbench: {runtimes: torchscript, cases: step}\n").eval is None
    steps = Recipe.from_yaml("model: m\nprune: {sparsity: 0.5}\nbench: {runtimes: torchscript, cases: step}\n").steps()
    assert steps == [BenchStep(runtimes=("torchscript",), cases=(Case("step-nocache", 1, 1),))]
    again = r.with_settings({"eval.length": 64, "bench": None})
    assert again.eval == Eval(length=64) and again.bench is None and r.bench == Bench()  # a copy; r is unchanged


def test_recipes_become_pipeline_jobs() -> None:
    job = Recipe.load(REPO / "recipes" / "wanda-2of4.yaml").to_pipeline()
    assert job.prune.pattern == "2:4" and job.prune.overrides == {"*.down_proj": "skip"}
    assert job.steps == [
        ExportStep(onnx=OnnxExport(sparse_initializers=True)),
        BenchStep(runtimes=("eager", "onnxruntime"), cases=(Case("prefill", 1, 128), Case("step-nocache", 1, 1)), repeats=10),
    ]
    smoke = Recipe.load(REPO / "recipes" / "tiny-smoke.yaml").to_pipeline()
    assert smoke.steps[0] == ExportStep(torchscript=TorchScriptExport(path="model.pt", check=False))
    assert smoke.steps[1].cases == (Case("tiny", 1, 16),)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="must be a file name inside the output folder"):
        BenchStep(path="/tmp/bench.json")  # the driver layer checks its own steps too
    with pytest.raises(ConfigError, match="each step may appear once"):
        PipelineJob(job.prune, [BenchStep(), BenchStep()]).validate()


@dataclass(frozen=True)
class NoteStep(Step):
    """A step the recipe schema does not know."""

    name: ClassVar[str] = "note"

    def run(self, ctx: StepContext) -> dict[str, Any]:
        (ctx.folder / "NOTE").write_text("hello")
        return {"path": "NOTE"}


def test_a_pipeline_the_schema_cannot_express_is_refused() -> None:
    job = PipelineJob(PruneJob(model="m", sparsity=0.5), [NoteStep()])
    with pytest.raises(RecipeError, match=r"no section for the step NoteStep \('note'\)"):
        Recipe.from_pipeline(job)
    job = PipelineJob(PruneJob(model="m", sparsity=0.5), [BenchStep(), ExportStep(torchscript=TorchScriptExport())])
    with pytest.raises(RecipeError, match=r"runs its steps as \['export', 'bench'\], not \['bench', 'export'\]"):
        Recipe.from_pipeline(job)


class Quantize(RecipeModel):
    bits: Literal[4, 8] = Field(8, description="weight bits")


class ExtendedRecipe(Recipe):
    """A new job section (``quantize``) and a new step (``note``), added by subclassing."""

    quantize: Annotated[Quantize | None, OnOff] = None  # a real one would also extend job_fields / job_sections
    note: bool = False

    def steps(self) -> list[Step]:
        return [NoteStep(), *super().steps()] if self.note else super().steps()


def test_new_sections_extend_the_schema() -> None:
    r = ExtendedRecipe.from_yaml("model: m\nquantize: true\nprune: {sparsity: 0.5}\nnote: true\nbench: true\n")
    assert r.quantize == Quantize(bits=8) and r.to_job() == Recipe.from_yaml("model: m\nprune: {sparsity: 0.5}\n").to_job()
    assert [s.name for s in r.to_pipeline().steps] == ["note", "bench"]
    assert ExtendedRecipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(RecipeError, match=r"r.yaml:2: quantize.bits: 3 is not allowed; choose one of: 4, 8"):
        ExtendedRecipe.from_yaml("model: m\nquantize: {bits: 3}\nprune: {sparsity: 0.5}\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"r.yaml:2: quantise: unknown key; did you mean 'quantize'\?"):
        ExtendedRecipe.from_yaml("model: m\nquantise: {bits: 4}\nprune: {sparsity: 0.5}\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"r.yaml:2: quantize: unknown key"):
        Recipe.from_yaml("model: m\nquantize: true\nprune: {sparsity: 0.5}\n", "r.yaml")  # the base schema is unchanged


def test_recipes_only_describe_jobs() -> None:
    """graphprune/recipes turns YAML into jobs and back; running them is the driver layer's (pipeline/steps.py)."""
    runners = {"run_prune", "run_eval", "run_pipeline", "run_export", "run_bench", "bench_latency", "export_onnx", "export_torchscript", "load_model"}
    for path in (REPO / "graphprune" / "recipes").glob("*.py"):
        names = {a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) for a in node.names}
        assert not names & runners, f"{path.name} imports {sorted(names & runners)}"


def test_every_schema_key_is_documented() -> None:
    doc = (REPO / "docs" / "RECIPES.md").read_text()
    missing = [name for name, _ in walk_fields(Recipe) if f"| `{name}` |" not in doc]
    assert not missing, f"document these recipe keys in docs/RECIPES.md: {missing}"
