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


class OutputError(GraphPruneError):
    """An output could not be written (no space, no permission, read-only file system...).

    Raised by :mod:`graphprune.fileio` after it has removed everything the failed write
    left behind; the message names the final path (never a temporary one), the reason
    and a fix.

    Attributes:
        path: the path named in the message (None if the message names none).
        detail: the message after the path (reason and fix), so that a write nested in a
            staging folder can be re-reported under the folder's final name.
    """

    def __init__(self, message: str, *, path: object = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.detail = detail
