"""YAML for recipes: a safe reader that records the line of every key, and a writer whose output
any YAML reader reads back the same.

:func:`load_yaml` returns the data and a :class:`Where`, which maps key paths such as
``("prune", "overrides", "*.down_proj")`` to their lines; :mod:`graphprune.recipes.validation`
uses it to turn the ``loc`` of a pydantic error into ``file:line: key: message``::

    recipes/w24.yaml:7: prune.sparsty: unknown key; did you mean 'sparsity'? (allowed: method, sparsity, ...)

Scalars follow YAML 1.2: ``2:4`` stays the string "2:4" (YAML 1.1 reads it as the base-60
number 124), ``1e-4`` is a float, only ``true``/``false`` are booleans (``yes`` is a string), and
duplicate keys are errors. The loader is a ``SafeLoader``: no Python objects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from graphprune.errors import RecipeError

KeyPath = tuple[Any, ...]  # keys and list indices from the document's root: ("bench", "cases", 0)


@dataclass
class Where:
    """Where a document came from, to turn a key path into ``file:line``.

    Attributes:
        source: file name (or ``<string>``).
        lines: 1-based line of every key and list item, by path.
        labels: paths set elsewhere (``--set prune.sparsity=0.6``), named by that instead of a line.
    """

    source: str = "<recipe>"
    lines: dict[KeyPath, int] = field(default_factory=dict)
    labels: dict[KeyPath, str] = field(default_factory=dict)

    def line(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of the nearest enclosing key that has one (a missing key: its parent's)."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None

    def error(self, path: KeyPath, message: str) -> RecipeError:
        """``file:line: key: message``, or ``--set KEY=VALUE: key: message`` for a value set on the command line."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.labels:
                return RecipeError(f"{self.labels[path[:end]]}: {dotted(path)}: {message}")
        line = self.line(path)
        at = f"{self.source}:{line}" if line is not None else self.source
        key = dotted(path)
        return RecipeError(f"{at}: {key + ': ' if key else ''}{message}")


def dotted(path: KeyPath) -> str:
    """``("prune", "overrides", "*.q_proj")`` -> ``prune.overrides['*.q_proj']``; list items as ``[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


# ---------------------------------------------------------------------------- reading
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


def _record_lines(node: yaml.Node, path: KeyPath, where: Where) -> None:
    """Fill ``where.lines`` for every key and list item under ``node``; refuse duplicate and non-string keys."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for knode, vnode in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else None
            sub = path + (key,)
            where.lines[sub] = knode.start_mark.line + 1
            if not isinstance(key, str):
                raise where.error(sub, "keys must be plain strings.")
            if key in seen:
                raise RecipeError(f"{where.source}:{knode.start_mark.line + 1}: {dotted(sub)}: duplicate key.")
            seen.add(key)
            _record_lines(vnode, sub, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where.lines[path + (i,)] = item.start_mark.line + 1
            _record_lines(item, path + (i,), where)


def load_yaml(text: str, source: str = "<string>") -> tuple[Any, Where]:
    """Parse YAML safely; return the data and a :class:`Where` mapping key paths to lines."""
    where = Where(source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, where
        _record_lines(node, (), where)
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


# ---------------------------------------------------------------------------- writing
class _Dumper(yaml.SafeDumper):
    """Quotes the strings that :class:`_Loader` or a YAML 1.1 reader would read as something else
    (``'2:4'``, ``'1e-3'``, ``'yes'``), so dumped recipes mean the same to any YAML tool."""


_Dumper.yaml_implicit_resolvers = {
    ch: list(_Loader.yaml_implicit_resolvers.get(ch, [])) + list(yaml.SafeLoader.yaml_implicit_resolvers.get(ch, []))
    for ch in set(_Loader.yaml_implicit_resolvers) | set(yaml.SafeLoader.yaml_implicit_resolvers)
}

# Unicode line breaks (NEL, LS, PS) are folded to spaces inside plain and single-quoted
# scalars; a double-quoted scalar escapes them, so such strings read back unchanged.
_LINE_BREAKS = ("\x85", "\u2028", "\u2029")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = '"' if any(ch in value for ch in _LINE_BREAKS) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """YAML text that :func:`load_yaml` reads back to ``data`` (keys kept in the given order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
