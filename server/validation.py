"""Checking a prediction's input against its model's `Input` schema.

jsonschema does the checking (it reports every error with its path, which is what a 422 must
name); this module turns its errors into field-level messages and fills in defaults, so a
backend always receives a complete input.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import jsonschema
from jsonschema.exceptions import ValidationError

from models.catalog import ModelSchema
from server.errors import InputInvalid


@attrs.frozen
class ValidatedInput:
    #: What the model receives: defaults filled in, unknown fields left out.
    values: dict[str, Any]
    #: Schema fields the caller sent (the rest of `values` are defaults).
    provided: frozenset[str]
    #: Fields the caller sent that the schema does not know (ignored, noted in the logs).
    ignored: tuple[str, ...]


class InputValidator:
    """A compiled validator for one model schema."""

    def __init__(self, schema: ModelSchema, *, max_string_chars: int = 1_000_000) -> None:
        self._schema = schema.input
        self._max_chars = max_string_chars
        jsonschema.Draft7Validator.check_schema(self._schema)
        self._validator = jsonschema.Draft7Validator(self._schema)
        self._properties: Mapping[str, Any] = self._schema.get("properties", {})
        #: Inputs that take a URI (an image may come as a data: URI): the image limits bound
        #: these, not the string length limit.
        self._uri_fields = frozenset(
            name
            for name, prop in self._properties.items()
            if isinstance(prop, dict) and prop.get("format") == "uri"
        )

    def validate(self, raw: Any) -> ValidatedInput:
        if not isinstance(raw, dict):
            raise InputInvalid(
                [{"field": "input", "message": f"must be an object, not {_json_type(raw)}"}]
            )
        errors = [
            {"field": field, "message": message}
            for field, message in _value_errors(raw, self._max_chars, self._uri_fields)
        ]
        errors += [d for e in self._validator.iter_errors(raw) for d in _describe(e)]
        if errors:
            # One `required` error per missing field, each describing them all: keep one each.
            errors = list({(e["field"], e["message"]): e for e in errors}.values())
            errors.sort(key=lambda e: (self._order(e["field"]), e["field"]))
            raise InputInvalid(errors)
        values: dict[str, Any] = {}
        for name, prop in self._properties.items():
            if name in raw:
                value = raw[name]
                if prop.get("type") == "integer" and isinstance(value, float):
                    value = int(value)  # 5.0 is an integer to JSON Schema; give the model 5
                values[name] = value
            elif "default" in prop:
                values[name] = copy.deepcopy(prop["default"])
        ignored = tuple(sorted(k for k in raw if k not in self._properties))
        provided = frozenset(k for k in raw if k in self._properties)
        return ValidatedInput(values=values, provided=provided, ignored=ignored)

    def _order(self, field: str) -> int:
        prop = self._properties.get(field, {})
        order = prop.get("x-order", 10_000) if isinstance(prop, dict) else 10_000
        return order if isinstance(order, int) else 10_000


def _value_errors(
    value: Any, limit: int | None, exempt: frozenset[str], path: tuple[str, ...] = ()
) -> Iterator[tuple[str, str]]:
    """(dotted path, message) for what JSON Schema lets through, anywhere in `value`:

    NaN and infinities (not JSON, but Python's json and the form parser make them, and every
    bound lets NaN through), and strings longer than `limit` (except in top-level `exempt`
    fields, which other limits bound; None: no length limit).
    """
    field = ".".join(path) if path else "input"
    match value:
        case float() if not math.isfinite(value):
            yield field, "must be a finite number"
        case str() if limit is not None and len(value) > limit:
            yield field, f"is longer than {limit} characters ({len(value)})"
        case dict():
            for key, item in value.items():
                bound = None if not path and key in exempt else limit
                yield from _value_errors(item, bound, exempt, (*path, str(key)))
        case list():
            for index, item in enumerate(value):
                yield from _value_errors(item, limit, exempt, (*path, str(index)))


def _json_type(value: Any) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case _:
            return "an object"


def _describe(error: ValidationError) -> list[dict[str, str]]:
    path = [str(p) for p in error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, dict):
        required: list[Any] = list(error.validator_value)  # type: ignore[arg-type]
        missing = [n for n in required if isinstance(n, str) and n not in error.instance]
        # Name every missing field, not just the first (minigpt-4 requires prompt and image).
        fields = [".".join([*path, n]) for n in missing] or [".".join(path) or "input"]
        return [{"field": field, "message": "is required"} for field in fields]
    field = ".".join(path) or "input"
    match error.validator:
        case "type":
            expected = error.validator_value
            message = f"must be {_article(expected)}, not {_json_type(error.instance)}"
        case "minimum":
            message = f"must be at least {error.validator_value} (got {error.instance})"
        case "maximum":
            message = f"must be at most {error.validator_value} (got {error.instance})"
        case "exclusiveMinimum":
            message = f"must be greater than {error.validator_value} (got {error.instance})"
        case "exclusiveMaximum":
            message = f"must be less than {error.validator_value} (got {error.instance})"
        case "enum":
            options: list[Any] = list(error.validator_value)  # type: ignore[arg-type]
            choices = ", ".join(repr(c) for c in options)
            message = f"must be one of {choices}"
        case "maxLength":
            message = f"must be at most {error.validator_value} characters long"
        case _:
            message = error.message
    return [{"field": field, "message": message}]


def _article(expected: Any) -> str:
    if isinstance(expected, list):
        return " or ".join(_article(e) for e in expected)
    return {"integer": "an integer", "array": "an array", "object": "an object"}.get(
        str(expected), f"a {expected}"
    )
