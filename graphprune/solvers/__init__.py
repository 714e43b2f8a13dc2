"""Per-Linear sparsity solvers: pure tensor math, no graph, no modules.

``SOLVERS`` maps a method name to its :class:`SolverInfo` (function and the
statistics it needs). Solver modules are imported on first use.
"""
from __future__ import annotations

import importlib

from graphprune.errors import ConfigError
from graphprune.solvers.base import LayerStats, SolveResult, SolverInfo, check_inputs, reconstruction_error
from graphprune.solvers.spec import SparsitySpec

# name -> (module, function, needs_hessian, needs_grad, description)
_REGISTRY: dict[str, tuple[str, str, bool, bool, str]] = {
    "magnitude": ("magnitude", "magnitude_prune", False, False, "|W|, ranked per row"),
    "wanda": ("wanda", "wanda_prune", False, False, "|W|·‖X_j‖, ranked per row (Sun et al. 2023)"),
    "sparsegpt": ("sparsegpt", "sparsegpt_prune", True, False, "OBS with lazy blocked updates (Frantar & Alistarh 2023)"),
    "gblm": ("gblm", "gblm_prune", False, True, "|W|·‖X‖ + α|W|·‖G‖ (Das et al. 2023)"),
    "alps": ("alps", "alps_prune", True, False, "ADMM with ρ schedule + PCG refinement (Meng et al. 2024)"),
    "proximal": ("proximal", "proximal_nm_prune", True, False, "proximal 2:4 regulariser + exact refit on the mask"),
}
_NATIVE_OPS: dict[str, tuple[str, ...]] = {"proximal": ("prox24",)}

METHODS: tuple[str, ...] = tuple(_REGISTRY)


def get_solver(name: str) -> SolverInfo:
    """The solver registered under ``name``; a clear error for unknown names."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown pruning method {name!r}; choose one of: {', '.join(METHODS)}.")
    module, fn, hess, grad, desc = _REGISTRY[key]
    mod = importlib.import_module(f"graphprune.solvers.{module}")
    return SolverInfo(key, getattr(mod, fn), needs_hessian=hess, needs_grad=grad, description=desc,
                      native_ops=_NATIVE_OPS.get(key, ()))


__all__ = [
    "LayerStats",
    "METHODS",
    "SolveResult",
    "SolverInfo",
    "SparsitySpec",
    "check_inputs",
    "get_solver",
    "reconstruction_error",
]
