"""The schema machinery on its own: pydantic models with the recipe shorthands, errors naming the
key and the line, and the YAML reader and writer."""
from __future__ import annotations

from typing import Annotated, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field, field_validator

from graphprune.errors import RecipeError
from graphprune.recipes.validation import Either, NullIsEmpty, OneOrMore, OnOff, RecipeModel, blame, type_at, validate, walk_fields
from graphprune.recipes.yaml_lines import Where, dump_yaml, load_yaml


class Inner(RecipeModel):
    x: int = 1


class Off(RecipeModel):
    y: int = 2


class Item(RecipeModel):
    a: int


class Doc(RecipeModel):
    name: str
    rate: float = Field(0.5, ge=0)
    count: Literal["one", "two", "three"] = "three"
    flag: bool = False
    inner: Inner = Field(default_factory=Inner)
    off: Annotated[Off | None, OnOff] = None
    tags: Annotated[list[str], OneOrMore] = Field(default_factory=list)
    free: Annotated[dict[str, Annotated[float | str | None, Either("a number or a string or null")]], NullIsEmpty] = Field(default_factory=dict)
    items: list[Item] = Field(default_factory=list)

    @field_validator("free")
    @classmethod
    def _no_bad_keys(cls, free: dict[str, float | str | None]) -> dict[str, float | str | None]:
        for key in free:
            with blame(key):
                if key.startswith("bad"):
                    raise ValueError(f"{key!r} is a bad key.")
        return free


def check(text: str) -> Doc:
    raw, where = load_yaml(text, "t.yaml")
    return validate(Doc, raw, where)


def test_defaults_shorthands_and_ints_become_floats() -> None:
    out = check("name: n\nrate: 1\noff: true\ntags: one\nfree:\n")
    assert out.model_dump() == {
        "name": "n", "rate": 1.0, "count": "three", "flag": False, "inner": {"x": 1}, "off": {"y": 2},
        "tags": ["one"], "free": {}, "items": [],
    }
    assert isinstance(out.rate, float)
    assert check("name: n\noff: false\n").off is None
    assert check("name: n\ntags:\n").tags == []
    assert check("name: n\nfree: {a: 1, b: x, c: null}\n").free == {"a": 1.0, "b": "x", "c": None}


def test_yaml_12_scalars() -> None:
    raw, _ = load_yaml("a: 2:4\nb: 1e-4\nc: yes\nd: true\ne: 0x10\nf: .5\ng: 1_000\n")
    assert raw == {"a": "2:4", "b": 1e-4, "c": "yes", "d": True, "e": 16, "f": 0.5, "g": 1000}


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: n\nrat: 1\n", "t.yaml:2: rat: unknown key; did you mean 'rate'? (allowed: name, rate, count, flag, inner, off, tags, free, items)."),
        ("name: n\ninner:\n  x: 1\n  z: 2\n", "t.yaml:4: inner.z: unknown key; (allowed: x)."),
        ("name: n\nflag: 3\nrat: 1\n", "t.yaml:3: rat: unknown key"),  # a typo first: it explains the other errors
        ("name: n\ntags: [3]\nflag: 3\n", "t.yaml:2: tags[0]: expected a string"),  # else the first in the file,
        ("flag: 3\n", "t.yaml: missing required key 'name'"),  # a missing top-level key (no line) first
        ("rate: 1\n", "t.yaml: missing required key 'name'"),
        ("name: n\nrate: -1\n", "t.yaml:2: rate: must be >= 0, got -1"),
        ("name: n\ncount: thre\n", "t.yaml:2: count: 'thre' is not allowed; did you mean 'three'? choose one of: one, two, three."),
        ("name: n\nflag: yes\n", "t.yaml:2: flag: expected true or false, got 'yes'"),
        ("name: 1\n", "t.yaml:1: name: expected a string, got 1"),
        ("name: n\ninner: {x: true}\n", "t.yaml:2: inner.x: expected an integer, got True"),
        ("name: n\nname: m\n", "t.yaml:2: name: duplicate key"),
        ("name: n\ntags:\n  - a\n  - 3\n", "t.yaml:4: tags[1]: expected a string, got 3"),
        ("name: n\nfree: {'*.q': [1]}\n", "t.yaml:2: free['*.q']: expected a number or a string or null, got a list"),
        ("name: n\nfree:\n  ok: 1\n  bad.x: 2\n", "t.yaml:4: free['bad.x']: 'bad.x' is a bad key."),
        ("name: n\nitems:\n  - {a: 1}\n  - {a: x}\n", "t.yaml:4: items[1].a: expected an integer, got 'x'"),
        ("name: n\nitems:\n  - {a: 1}\n  - {}\n", "t.yaml:4: items[1]: missing required key 'a'"),
        ("name: n\noff: 3\n", "t.yaml:2: off: expected a mapping of y, got 3"),
        ("name: [n\n", "t.yaml:2: invalid YAML"),
        ("name: n\nrate: .nan\n", "t.yaml:2: rate: expected a finite number, got nan"),
        ("[1, 2]\n", "t.yaml: expected a mapping of name, rate"),
    ],
)
def test_errors_name_key_and_line(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        check(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_labels_name_command_line_settings() -> None:
    where = Where("t.yaml", labels={("rate",): "--set rate=-2"})
    with pytest.raises(RecipeError, match=r"^--set rate=-2: rate: must be >= 0"):
        validate(Doc, {"name": "n", "rate": -2}, where)


def test_keys_of_the_schema() -> None:
    assert [k for k, _ in walk_fields(Doc)] == ["name", "rate", "count", "flag", "inner", "inner.x", "off", "off.y", "tags", "free", "items"]
    assert type_at(Doc, ("off",)) is Off and type_at(Doc, ("items", 0)) is Item and type_at(Doc, ("nope",)) is None


def test_either_annotates_unions_only() -> None:
    with pytest.raises(TypeError, match="annotates a union"):

        class Bad(RecipeModel):
            value: Annotated[int, Either("a number")] = 0


_chars = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"))
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_chars, max_size=8)
    | st.sampled_from(["2:4", "1e-3", "yes", "no", "null", "0x1f", "1_0", "on", "~", "3.", "-.inf"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(_chars, min_size=1, max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(_chars, min_size=1, max_size=6), _values, max_size=4))
def test_dump_then_load_is_identity(data) -> None:
    back, _ = load_yaml(dump_yaml(data))
    assert back == data
