"""One error hierarchy for graphprune.

Every message says what went wrong, where (node, module, key), and how to fix it.
The CLI prints these without a traceback; anything else is a bug.
"""
from __future__ import annotations


class GraphPruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class ConfigError(GraphPruneError):
    """A user-supplied setting is invalid (sparsity, pattern, method, path...)."""


class ModelLoadError(GraphPruneError):
    """A model could not be found or loaded."""


class DataError(GraphPruneError):
    """Calibration or evaluation text is missing or too short."""


class CaptureError(GraphPruneError):
    """A model could not be traced into a graph."""


class PassOrderError(GraphPruneError):
    """A pass ran before a property it requires was established."""


class VerificationError(GraphPruneError):
    """A pass broke the graph or changed the outputs while claiming not to."""


class SolverError(GraphPruneError):
    """A solver got inputs it cannot work with (shapes, non-finite values...)."""


class RecipeError(GraphPruneError):
    """A recipe file does not match the schema."""


class ExportError(GraphPruneError):
    """A model could not be exported or the export does not match PyTorch."""
