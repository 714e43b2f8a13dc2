"""The package's layering (docs/ARCHITECTURE.md): imports point downward only, and no module
imports another that (directly or through others) imports it back."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import graphprune

ROOT = Path(graphprune.__file__).resolve().parent

#: Lowest layer first; a package imports packages of lower layers only (not of its own layer).
LAYERS: list[set[str]] = [
    {"errors", "__init__"},
    {"fileio"},  # imports errors only
    {"distributed"},
    {"data", "models", "graph", "kernels", "solvers"},
    {"passes", "eval", "exporters"},
    {"bench"},
    {"pipeline"},
    {"recipes"},
    {"cli"},
    {"__main__"},
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every graphprune module ``path`` imports, at module level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphprune"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("graphprune"))
    return out


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    for mod, path in modules.items():
        g.add_node(mod)
        for target in _imports(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]  # `from graphprune.x import name`
            if target != mod and target != "graphprune":
                g.add_edge(mod, target)
    return g


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer() -> None:
    missing = sorted({_package(m) for m in _graph().nodes} - set(LEVEL))
    assert not missing, f"add {missing} to LAYERS (and to docs/ARCHITECTURE.md)"


def _upward(g: nx.DiGraph) -> list[str]:
    return sorted(
        f"{a} -> {b}" for a, b in g.edges if _package(a) != _package(b) and LEVEL[_package(b)] >= LEVEL[_package(a)]
    )


def test_imports_point_downward() -> None:
    upward = _upward(_graph())
    assert not upward, "imports that do not point to a lower layer:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_checks_catch_what_they_guard() -> None:
    """An upward import, a same-layer import and a cycle added to the real graph are all found."""
    g = _graph()
    g.add_edge("graphprune.solvers.base", "graphprune.pipeline.prune")
    g.add_edge("graphprune.passes.prune", "graphprune.exporters.hf")
    assert _upward(g) == ["graphprune.passes.prune -> graphprune.exporters.hf", "graphprune.solvers.base -> graphprune.pipeline.prune"]
    assert list(nx.simple_cycles(g))
