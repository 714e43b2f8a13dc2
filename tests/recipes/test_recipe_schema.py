"""The strict schema and the YAML reader: types, defaults, unknown keys and lines in errors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.errors import RecipeError
from graphprune.recipes.schema import Dict, List, Mapping, Scalar, Union, Where, dump_yaml, load_yaml

SCHEMA = Mapping(
    {
        "name": Scalar((str,)),
        "rate": Scalar((float,), 0.5, minimum=0),
        "count": Scalar((int,), 3, choices=(1, 2, 3)),
        "flag": Scalar((bool,), False),
        "inner": Mapping({"x": Scalar((int,), 1)}, default=dict),
        "off": Mapping({"y": Scalar((int,), 2)}, default=None, nullable=True, shorthand={}),
        "tags": List(Scalar((str,)), single=True),
        "free": Dict(Scalar((float, str), nullable=True)),
        "either": Union([Scalar((str,)), Mapping({"a": Scalar((int,))})], default=None),
    }
)


def check(text: str):
    raw, where = load_yaml(text, "t.yaml")
    return SCHEMA.validate(raw, (), where)


def test_defaults_are_filled_and_ints_become_floats() -> None:
    out = check("name: n\nrate: 1\noff: true\ntags: one\n")
    assert out == {
        "name": "n", "rate": 1.0, "count": 3, "flag": False, "inner": {"x": 1}, "off": {"y": 2},
        "tags": ["one"], "free": {}, "either": None,
    }
    assert isinstance(out["rate"], float)
    assert check("name: n\noff: false\n")["off"] is None


def test_yaml_12_scalars() -> None:
    raw, _ = load_yaml("a: 2:4\nb: 1e-4\nc: yes\nd: true\ne: 0x10\nf: .5\ng: 1_000\n")
    assert raw == {"a": "2:4", "b": 1e-4, "c": "yes", "d": True, "e": 16, "f": 0.5, "g": 1000}


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: n\nrat: 1\n", "t.yaml:2: rat: unknown key; did you mean 'rate'?"),
        ("name: n\ninner:\n  x: 1\n  z: 2\n", "t.yaml:4: inner.z: unknown key"),
        ("rate: 1\n", "t.yaml: missing required key 'name'"),
        ("name: n\nrate: -1\n", "t.yaml:2: rate: must be >= 0"),
        ("name: n\ncount: 4\n", "t.yaml:2: count: 4 is not allowed"),
        ("name: n\nflag: yes\n", "t.yaml:2: flag: expected true or false, got 'yes'"),
        ("name: n\nname: m\n", "t.yaml:2: name: duplicate key"),
        ("name: n\ntags:\n  - a\n  - 3\n", "t.yaml:4: tags[1]: expected a string, got 3"),
        ("name: n\nfree: {'*.q': [1]}\n", "t.yaml:2: free['*.q']: expected a number or a string or null, got a list"),
        ("name: n\neither: {a: x}\n", "t.yaml:2: either.a: expected an integer"),
        ("name: n\neither: 3\n", "t.yaml:2: either: expected"),
        ("name: [n\n", "t.yaml:2: invalid YAML"),
        ("name: n\nrate: .nan\n", "rate: expected a finite number"),
        ("[1, 2]\n", "t.yaml: expected a mapping"),
    ],
)
def test_errors_name_key_and_line(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        check(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_labels_name_command_line_settings() -> None:
    where = Where("t.yaml", labels={("rate",): "--set rate=-2"})
    with pytest.raises(RecipeError, match=r"^--set rate=-2: rate: must be >= 0"):
        SCHEMA.validate({"name": "n", "rate": -2}, (), where)


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
