"""The pydantic side of recipes: a strict base model, the YAML shorthands, and one-line errors.

Every mapping in a recipe is a :class:`RecipeModel` (pydantic v2, ``extra="forbid"``,
``strict=True``): unknown keys are errors, ``yes`` is not a boolean, ``1`` is not a string, an
integer is accepted where a number is (and becomes a float), NaN and infinities are refused.
The shorthands of the format are field annotations:

* :data:`OnOff` -- an optional section written ``true`` takes its defaults, ``false`` turns it off;
* :data:`OneOrMore` -- a list may be written as its one item (``text: a.txt``); null is empty;
* :data:`NullIsEmpty` -- a free mapping (globs, options) may be null;
* :class:`Either` -- a union of scalars (``float | str | None``) fails with one message, not one per member;
* :func:`checked` -- a value is checked by the one place that knows the rule (``SparsitySpec``,
  ``parse_rules``, ...), whose ``ValueError`` / :class:`~graphprune.errors.GraphPruneError` becomes
  the error of that key; :class:`Blame` names a key below the one being validated.

:func:`validate` runs pydantic and :func:`recipe_error` turns its ``ValidationError`` into a one-line
:class:`~graphprune.errors.RecipeError` naming the file, the line and the key (through the
:class:`~graphprune.recipes.yaml_lines.Where` of the document), with a nearest-match hint for an
unknown key or a value outside a ``Literal``::

    r.yaml:7: prune.sparsty: unknown key; did you mean 'sparsity'? (allowed: method, sparsity, ...)
    r.yaml:3: bench.runtimes[0]: 'tensorrt' is not allowed; choose one of: eager, torchscript, onnxruntime.
"""
from __future__ import annotations

import difflib
import types
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Iterable, Iterator, TypeVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, GetCoreSchemaHandler, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import CoreSchema, ErrorDetails

from graphprune.errors import GraphPruneError, RecipeError
from graphprune.recipes.yaml_lines import KeyPath, Where


class RecipeModel(BaseModel):
    """Base of every mapping in a recipe: strict types, unknown keys refused, immutable once validated."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


# ---------------------------------------------------------------------------- shorthands
def _on_off(value: Any) -> Any:
    return {} if value is True else None if value is False else value


def _one_or_more(value: Any) -> Any:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _null_is_empty(value: Any) -> Any:
    return {} if value is None else value


OnOff = BeforeValidator(_on_off)
"""``section: true`` = ``section: {}`` (every default); ``section: false`` = ``section: null`` (off)."""

OneOrMore = BeforeValidator(_one_or_more)
"""``key: item`` = ``key: [item]``; ``key: null`` = ``key: []``."""

NullIsEmpty = BeforeValidator(_null_is_empty)
"""``key: null`` = ``key: {}``."""


class Either:
    """Annotation of a union of scalars: fails with one error, ``expected <what>``, instead of one per member.

    Example: ``Annotated[float | str | None, Either("a sparsity, an 'N:M' pattern or 'skip'")]``.
    """

    def __init__(self, what: str) -> None:
        self.what = what

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        union: dict[str, Any] = schema["schema"] if schema["type"] == "nullable" else schema  # type: ignore[assignment]
        if union["type"] != "union":
            raise TypeError(f"Either({self.what!r}) annotates a union of scalars, not {source}.")
        union["custom_error_type"] = "either_type"  # one error for the union, named by the error translation below
        union["custom_error_message"] = f"expected {self.what}"
        return schema


class Blame(ValueError):
    """Raised by a validator to report an error at one of its keys (``key``) rather than at itself."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@contextmanager
def blame(key: str | None = None) -> Iterator[None]:
    """Report a ``ValueError`` or ``GraphPruneError`` raised inside as an error at ``key`` (None: here)."""
    try:
        yield
    except Blame:
        raise
    except (ValueError, GraphPruneError) as exc:
        raise Blame(str(exc), key) from exc


def checked(check: Callable[[Any], object]) -> AfterValidator:
    """Annotation that validates a (non-null) value with ``check(value)``, which raises on a bad one."""

    def run(value: Any) -> Any:
        if value is not None:
            with blame():
                check(value)
        return value

    return AfterValidator(run)


# ---------------------------------------------------------------------------- errors
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "list_type": "a list",
}


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return repr(value)


def _hint(value: Any, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def not_one_of(value: Any, choices: Iterable[Any]) -> str:
    """``'qr' is not allowed; did you mean 'pca'? choose one of: pca, hadamard, learned.``"""
    names = [str(c) for c in choices]
    return f"{_show(value)} is not allowed; {_hint(value, names)}choose one of: {', '.join(names)}."


def _bare(annotation: Any) -> Any:
    """``Annotated[X | None, ...]`` -> ``X``: what a value at this key is, without the wrappers."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType) and sum(a is not type(None) for a in get_args(annotation)) == 1:
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def type_at(model: type[BaseModel], path: KeyPath) -> Any:
    """The annotation of the value at ``path`` in documents of ``model`` (None where there is no such key)."""
    annotation: Any = model
    for part in path:
        annotation = _bare(annotation)
        if _is_model(annotation):
            info = annotation.model_fields.get(part) if isinstance(part, str) else None
            if info is None:
                return None
            annotation = info.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif get_origin(annotation) in (list, tuple):
            annotation = get_args(annotation)[0]
        else:
            return None
    return _bare(annotation)


def _located(model: type[BaseModel], err: ErrorDetails) -> tuple[KeyPath, str]:
    """The key path an error belongs to and its message, in the words of the recipe format."""
    path: KeyPath = tuple(err["loc"])
    kind, value, ctx = err["type"], err["input"], err.get("ctx", {})
    if path and path[-1] == "[key]":  # a mapping key of the wrong type (only possible from Python, not YAML)
        return path[:-2], f"keys must be strings, got {path[-2]!r}."
    if kind == "extra_forbidden":
        parent = type_at(model, path[:-1])
        allowed = list(parent.model_fields) if _is_model(parent) else []
        return path, f"unknown key; {_hint(path[-1], allowed)}(allowed: {', '.join(allowed)})."
    if kind == "missing":
        return path[:-1], f"missing required key {path[-1]!r}."
    if kind in ("value_error", "assertion_error"):
        exc = ctx["error"]
        if isinstance(exc, Blame) and exc.key is not None:
            path += (exc.key,)
        return path, str(exc)
    if kind == "literal_error":
        return path, not_one_of(value, get_args(type_at(model, path)))
    if kind in ("model_type", "model_attributes_type"):
        target = type_at(model, path)
        keys = f" of {', '.join(target.model_fields)}" if _is_model(target) else ""
        return path, f"expected a mapping{keys}, got {_show(value)}."
    if kind in _EXPECTED:
        return path, f"expected {_EXPECTED[kind]}, got {_show(value)}."
    if kind == "either_type":
        return path, f"{err['msg']}, got {_show(value)}."
    if kind == "finite_number":
        return path, f"expected a finite number, got {value}."
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op, bound = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}[kind]
        return path, f"must be {op} {ctx[bound]:g}, got {value}."
    if kind == "too_short":
        return path, f"needs at least {ctx['min_length']} item(s)."
    return path, f"{err['msg']}."  # pydantic's own words for anything rarer


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], raw: Any, where: Where) -> M:
    """``model.model_validate(raw)``, a failure reported as a one-line RecipeError by :func:`recipe_error`."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise recipe_error(exc, model, where) from exc


def recipe_error(exc: ValidationError, model: type[BaseModel], where: Where) -> RecipeError:
    """One of ``exc``'s errors as a one-line RecipeError: an unknown key if any (a typo often explains the
    rest), else the first in the file (a missing top-level key, which has no line, before the others)."""
    errors = [(err["type"] == "extra_forbidden", *_located(model, err)) for err in exc.errors()]
    _, path, message = min(errors, key=lambda e: (not e[0], where.line(e[1]) or 0))
    return where.error(path, message)


def walk_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """``(dotted key, field)`` for every key of ``model``'s documents, depth first (for docs and tests)."""
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        yield key, info
        inner = _bare(info.annotation)
        if _is_model(inner):
            yield from walk_fields(inner, key)

