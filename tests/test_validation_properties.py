"""Properties of `InputValidator` over every seed schema in schemas/, with Hypothesis.

Two kinds of input: arbitrary JSON (what any client may send as `input`), and inputs built
from the schema itself (each property present or not, with a value of its type inside its
bounds, or an arbitrary one), so that both acceptance and rejection are exercised a lot.

Whatever the input, the validator either answers a `ValidatedInput` or raises `InputInvalid`,
and it agrees with jsonschema (Draft 7) on which is which, except that NaN and the
infinities (which JSON does not have) are always refused. An accepted input carries every
required field and every default; a rejection names fields that are in the input or required
by the schema, so a caller can act on it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.catalog import ModelSchema, load_schema
from server.errors import InputInvalid
from server.validation import InputValidator, ValidatedInput

SCHEMAS = sorted((Path(__file__).resolve().parent.parent / "schemas").glob("*.json"))
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

#: NaN and the infinities: Python's `json.loads` and the playground's form parser make them.
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])

#: Any value Python's `json.loads` can produce (it also reads NaN and Infinity).
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | NON_FINITE | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def value_for(prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A value of the property's type within its bounds (the usual, valid case)."""
    low, high = prop.get("minimum"), prop.get("maximum")
    match prop.get("type"):
        case "string":
            return st.text(max_size=30)
        case "integer":
            return st.integers(
                min_value=math.ceil(low) if low is not None else None,
                max_value=math.floor(high) if high is not None else None,
            )
        case "number":
            return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
        case "boolean":
            return st.booleans()
        case "array":
            return st.lists(value_for(prop.get("items", {})), max_size=4)
        case _:
            return json_values


@st.composite
def schema_shaped(draw: st.DrawFn, schema: dict[str, Any]) -> dict[str, Any]:
    """An input object: each property left out, well typed, or arbitrary; plus unknown keys."""
    raw: dict[str, Any] = {}
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        leave_out = st.just(False) if name in required else st.booleans()
        if draw(st.integers(0, 9)) == 0 or draw(leave_out):
            continue  # a required field is left out now and then
        pick = draw(st.integers(0, 9))
        if pick == 0:
            raw[name] = draw(json_values)
        elif pick == 1 and prop.get("type") == "number":
            raw[name] = draw(NON_FINITE)  # inside no bounds, yet every comparison is false
        else:
            raw[name] = draw(value_for(prop))
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=2))
    for key, value in extra.items():
        raw.setdefault(key, value)
    return raw


@pytest.fixture(params=SCHEMAS, ids=[p.stem for p in SCHEMAS], scope="module")
def model_schema(request: pytest.FixtureRequest) -> ModelSchema:
    path: Path = request.param
    return load_schema(path)


def is_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(is_finite(v) for v in value)
    return True


def check(model_schema: ModelSchema, raw: Any) -> None:
    """The properties, for one input."""
    validator = InputValidator(model_schema)
    schema = model_schema.input
    properties: dict[str, Any] = schema.get("properties", {})
    required: list[str] = schema.get("required", [])
    expected_valid = (
        isinstance(raw, dict)
        and is_finite(raw)
        and jsonschema.Draft7Validator(schema).is_valid(raw)
    )
    try:
        result = validator.validate(raw)
    except InputInvalid as exc:
        assert not expected_valid, f"rejected a valid input: {exc.errors}"
        assert exc.status == 422
        assert exc.errors, "a rejection must name at least one field"
        for error in exc.errors:
            assert error["message"], error
            if not isinstance(raw, dict):
                assert error["field"] == "input"
                continue
            # A field is a dotted path from a top-level key (and keys may contain dots).
            field = error["field"]
            assert any(field == key or field.startswith(f"{key}.") for key in [*raw, *required]), (
                f"{field!r} is neither in the input nor required"
            )
        if isinstance(raw, dict):
            named = {e["field"] for e in exc.errors}
            assert {n for n in required if n not in raw} <= named, "a missing field unnamed"
            pairs = [(e["field"], e["message"]) for e in exc.errors]
            assert len(pairs) == len(set(pairs)), f"repeated errors: {pairs}"
        return
    # Anything other than InputInvalid escaping `validate` fails the test right here.
    assert isinstance(result, ValidatedInput)
    assert expected_valid, f"accepted an invalid input: {raw!r}"
    assert isinstance(raw, dict)
    for name in required:
        assert name in result.values
    for name, prop in properties.items():
        if name in raw:
            assert result.values[name] == raw[name]
            if prop.get("type") == "integer":
                assert type(result.values[name]) is int
        elif "default" in prop:
            assert result.values[name] == prop["default"]
        else:
            assert name not in result.values
    assert set(result.values) <= set(properties)
    assert result.provided == frozenset(raw) & frozenset(properties)
    assert set(result.ignored) == set(raw) - set(properties)


@PROPERTY_SETTINGS
@given(raw=json_values)
def test_arbitrary_json(model_schema: ModelSchema, raw: Any) -> None:
    check(model_schema, raw)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_schema_shaped_inputs(model_schema: ModelSchema, data: st.DataObject) -> None:
    check(model_schema, data.draw(schema_shaped(model_schema.input)))


@pytest.mark.parametrize("schema_path", SCHEMAS, ids=[p.stem for p in SCHEMAS])
def test_defaults_are_copies(schema_path: Path) -> None:
    """Changing one prediction's input must not change the schema's defaults for the next."""
    model_schema = load_schema(schema_path)
    validator = InputValidator(model_schema)
    raw = {name: "x" for name in model_schema.input.get("required", [])}
    first = validator.validate(raw).values
    for value in first.values():
        if isinstance(value, list | dict):
            value.clear()
    second = validator.validate(raw).values
    for name, prop in model_schema.input.get("properties", {}).items():
        if "default" in prop and name not in raw:
            assert second[name] == prop["default"]
