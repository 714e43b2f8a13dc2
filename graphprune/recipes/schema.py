"""A small strict schema for YAML recipes: typed fields, defaults, unknown keys rejected,
and every error naming the key path and the line it is on.

Schemas are plain objects (:class:`Scalar`, :class:`Mapping`, :class:`Dict`, :class:`List`,
:class:`Union`) whose ``validate(value, path, where)`` returns the value with defaults
filled in, or raises :class:`graphprune.errors.RecipeError` such as::

    recipes/w24.yaml:7: prune.sparsty: unknown key; did you mean 'sparsity'? (allowed: method, sparsity, ...)

YAML is read with :func:`load_yaml`, a safe loader (no Python objects) with YAML 1.2 style
scalars: ``2:4`` stays the string "2:4" (YAML 1.1 reads it as the base-60 number 124),
``1e-4`` is a float, only ``true``/``false`` are booleans, and duplicate keys are errors.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import yaml

from graphprune.errors import RecipeError

Path_ = tuple[Any, ...]  # key path inside the document: ("prune", "overrides", "*.down_proj")
MISSING: Any = object()  # "no default": the key is required


# ---------------------------------------------------------------------------- locating errors
@dataclass
class Where:
    """Where a document came from, to turn a key path into ``file:line``.

    Attributes:
        source: file name (or ``<string>``).
        lines: 1-based line of every key and list item, by path.
        labels: paths set elsewhere (``--set prune.sparsity=0.6``), named by that instead of a line.
    """

    source: str = "<recipe>"
    lines: dict[Path_, int] = field(default_factory=dict)
    labels: dict[Path_, str] = field(default_factory=dict)

    def line(self, path: Path_) -> int | None:
        for end in range(len(path), -1, -1):  # nearest enclosing key that has a line
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None

    def error(self, path: Path_, message: str) -> RecipeError:
        for end in range(len(path), 0, -1):
            if path[:end] in self.labels:
                return RecipeError(f"{self.labels[path[:end]]}: {dotted(path)}: {message}")
        line = self.line(path)
        at = f"{self.source}:{line}" if line is not None else self.source
        key = dotted(path)
        return RecipeError(f"{at}: {key + ': ' if key else ''}{message}")


def dotted(path: Path_) -> str:
    """``("prune", "overrides", "*.q_proj")`` -> ``prune.overrides['*.q_proj']``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


# ---------------------------------------------------------------------------- YAML
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 style implicit scalars (see the module docstring)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT, _BOOL)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    return int(str(node.value).replace("_", ""), 0)


_Loader.add_constructor(_INT, _construct_int)


def _lines(node: yaml.Node, path: Path_, where: Where) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for knode, vnode in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else None
            sub = path + (key,)
            if not isinstance(key, str):
                where.lines[sub] = knode.start_mark.line + 1
                raise where.error(sub, "keys must be plain strings.")
            if key in seen:
                raise RecipeError(f"{where.source}:{knode.start_mark.line + 1}: {dotted(sub)}: duplicate key.")
            seen.add(key)
            where.lines[sub] = knode.start_mark.line + 1
            _lines(vnode, sub, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where.lines[path + (i,)] = item.start_mark.line + 1
            _lines(item, path + (i,), where)


def load_yaml(text: str, source: str = "<string>") -> tuple[Any, Where]:
    """Parse YAML safely; return the data and a :class:`Where` mapping key paths to lines."""
    where = Where(source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, where
        _lines(node, (), where)
        return loader.construct_document(node), where
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise RecipeError(f"{source}{line}: invalid YAML: {problem}.") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()


def parse_scalar(text: str) -> Any:
    """A command-line value read like a YAML scalar (``0.5`` float, ``2:4`` str, ``null``...)."""
    value, _ = load_yaml(text, "--set")
    return value


class _Dumper(yaml.SafeDumper):
    """Quotes the strings that :class:`_Loader` or a YAML 1.1 reader would read as something else
    (``'2:4'``, ``'1e-3'``, ``'yes'``), so dumped recipes mean the same to any YAML tool."""


_Dumper.yaml_implicit_resolvers = {
    ch: list(_Loader.yaml_implicit_resolvers.get(ch, [])) + list(yaml.SafeLoader.yaml_implicit_resolvers.get(ch, []))
    for ch in set(_Loader.yaml_implicit_resolvers) | set(yaml.SafeLoader.yaml_implicit_resolvers)
}


def dump_yaml(data: Any) -> str:
    """YAML text that :func:`load_yaml` reads back to ``data`` (keys kept in schema order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


# ---------------------------------------------------------------------------- schemas
class Invalid(ValueError):
    """Raised by a Mapping's ``check`` to blame one of its keys (reported at that key's line)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class Schema:
    """Base class: ``validate`` returns the normalised value or raises RecipeError."""

    doc: str = ""
    default: Any = MISSING

    def accepts(self, value: Any) -> bool:  # used by Union to pick a branch
        return True

    def validate(self, value: Any, path: Path_, where: Where) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def default_value(self) -> Any:
        d = self.default
        return d() if callable(d) else d


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass
class Scalar(Schema):
    """A bool, int, float or str (or several), optionally null, from ``choices``, checked.

    Attributes:
        kinds: accepted Python types (int is accepted where float is, and converted).
        default: value when the key is absent; MISSING makes it required.
        nullable: accept ``null``.
        choices: allowed values.
        check: called with the value; raises ValueError (or ConfigError) with a message.
        minimum: smallest allowed number.
    """

    kinds: tuple[type, ...] = (str,)
    default: Any = MISSING
    doc: str = ""
    nullable: bool = False
    choices: Sequence[Any] | None = None
    check: Callable[[Any], None] | None = None
    minimum: float | None = None

    def accepts(self, value: Any) -> bool:
        return (value is None and self.nullable) or any(_is(value, k) for k in self.kinds)

    def validate(self, value: Any, path: Path_, where: Where) -> Any:
        from graphprune.errors import GraphPruneError

        if value is None and self.nullable:
            return None
        if not any(_is(value, k) for k in self.kinds):
            want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in self.kinds) + (" or null" if self.nullable else "")
            raise where.error(path, f"expected {want}, got {_show(value)}.")
        if float in self.kinds and _is(value, float) and not _is(value, bool) and int not in self.kinds:
            value = float(value)
            if not math.isfinite(value):
                raise where.error(path, f"expected a finite number, got {value}.")
        if self.choices is not None and value not in self.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise where.error(path, f"{_show(value)} is not allowed; {hint}choose one of: {', '.join(map(str, self.choices))}.")
        if self.minimum is not None and _is(value, float) and value < self.minimum:
            raise where.error(path, f"must be >= {self.minimum:g}, got {value}.")
        if self.check is not None:
            try:
                self.check(value)
            except (ValueError, GraphPruneError) as exc:
                raise where.error(path, str(exc)) from exc
        return value

    def describe(self) -> str:
        kinds = " | ".join(k.__name__ for k in self.kinds) + (" | null" if self.nullable else "")
        if self.choices is not None:
            kinds = " | ".join(map(str, self.choices))
        return kinds


@dataclass
class Mapping(Schema):
    """A mapping with a fixed set of keys, each with its own schema; unknown keys are errors.

    Attributes:
        fields: key -> schema, in the order they are documented and dumped.
        default: value when absent (``dict`` fills every field's default; None: absent = null).
        nullable: accept ``null`` (the section is off).
        shorthand: value accepted for ``true`` (e.g. ``eval: true`` = ``eval: {}``); ``false`` = null.
        check: called with the validated dict; raises ValueError/ConfigError.
    """

    fields: dict[str, Schema] = field(default_factory=dict)
    default: Any = MISSING
    doc: str = ""
    nullable: bool = False
    shorthand: Any = MISSING
    check: Callable[[dict[str, Any]], None] | None = None

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict) or (value is None and self.nullable)

    def validate(self, value: Any, path: Path_, where: Where) -> Any:
        from graphprune.errors import GraphPruneError

        if self.shorthand is not MISSING and isinstance(value, bool):
            value = dict(self.shorthand) if value else None
        if value is None and self.nullable:
            return None
        if not isinstance(value, dict):
            raise where.error(path, f"expected a mapping of {', '.join(self.fields)}, got {_show(value)}.")
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), list(self.fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise where.error(path + (key,), f"unknown key; {hint}(allowed: {', '.join(self.fields)}).")
        out: dict[str, Any] = {}
        for key, schema in self.fields.items():
            if key in value:
                out[key] = schema.validate(value[key], path + (key,), where)
            elif schema.default is MISSING:
                raise where.error(path, f"missing required key {key!r}.")
            else:
                default = schema.default_value()
                out[key] = schema.validate(default, path + (key,), where) if isinstance(schema, Mapping) and default is not None else default
        if self.check is not None:
            try:
                self.check(out)
            except Invalid as exc:
                raise where.error(path + ((exc.key,) if exc.key else ()), str(exc)) from exc
            except (ValueError, GraphPruneError) as exc:
                raise where.error(path, str(exc)) from exc
        return out

    def describe(self) -> str:
        return "mapping" + (" | null" if self.nullable else "")


@dataclass
class Dict(Schema):
    """A mapping with free string keys (globs, option names) and one value schema."""

    values: Schema = field(default_factory=Scalar)
    default: Any = dict
    doc: str = ""
    check_key: Callable[[str, Any], None] | None = None

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def validate(self, value: Any, path: Path_, where: Where) -> Any:
        from graphprune.errors import GraphPruneError

        if value is None:
            return {}
        if not isinstance(value, dict):
            raise where.error(path, f"expected a mapping, got {_show(value)}.")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise where.error(path + (key,), "keys must be strings.")
            out[key] = self.values.validate(item, path + (key,), where)
            if self.check_key is not None:
                try:
                    self.check_key(key, out[key])
                except (ValueError, GraphPruneError) as exc:
                    raise where.error(path + (key,), str(exc)) from exc
        return out

    def describe(self) -> str:
        return f"mapping of str -> {self.values.describe()}"


@dataclass
class List(Schema):
    """A list of items of one schema; ``single`` also accepts one bare item."""

    item: Schema = field(default_factory=Scalar)
    default: Any = list
    doc: str = ""
    single: bool = False
    min_items: int = 0

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list)

    def validate(self, value: Any, path: Path_, where: Where) -> Any:
        if value is None:
            value = []
        if not isinstance(value, list):
            if self.single and self.item.accepts(value):
                value = [value]
            else:
                raise where.error(path, f"expected a list, got {_show(value)}.")
        if len(value) < self.min_items:
            raise where.error(path, f"needs at least {self.min_items} item(s).")
        return [self.item.validate(v, path + (i,), where) for i, v in enumerate(value)]

    def describe(self) -> str:
        return f"list of {self.item.describe()}"


@dataclass
class Union(Schema):
    """One of several schemas, chosen by the value's type (first whose ``accepts`` matches)."""

    options: Sequence[Schema] = ()
    default: Any = MISSING
    doc: str = ""

    def accepts(self, value: Any) -> bool:
        return any(o.accepts(value) for o in self.options)

    def validate(self, value: Any, path: Path_, where: Where) -> Any:
        for option in self.options:
            if option.accepts(value):
                return option.validate(value, path, where)
        raise where.error(path, f"expected {' or '.join(o.describe() for o in self.options)}, got {_show(value)}.")

    def describe(self) -> str:
        return " or ".join(o.describe() for o in self.options)


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return repr(value)


def walk_fields(schema: Mapping, prefix: str = "") -> Iterable[tuple[str, Schema]]:
    """``(dotted key, schema)`` for every field, depth first (for generated docs and tests)."""
    for key, sub in schema.fields.items():
        name = f"{prefix}.{key}" if prefix else key
        yield name, sub
        if isinstance(sub, Mapping):
            yield from walk_fields(sub, name)
