"""From a model's Input JSON Schema to form fields, and from a submitted form back to input.

`fields_for(schema)` is pure: it decides, for each property, which control the playground
shows (a text area for prompts, a slider with a number box for bounded numbers, a select for
enums, a URL box with a file picker for `format: uri`, ...), in `x-order` order, with the
schema's title, description, default and bounds. `parse_form(fields, form)` turns the
submitted strings back into typed JSON values.

A field left at its default is not sent: the prediction's input then shows only what the
person changed, and the model applies its own defaults exactly as it does for API callers
(this matters for inputs whose presence means something, like `prompt_template`, or the
legacy `max_new_tokens` next to `max_tokens`). Ranges, required fields and enum membership
are not checked here: the model's schema validator does that and names the field.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import attrs

#: Property names that get a text area rather than a one-line box.
_LONG_TEXT = re.compile(r"(^|_)(prompt|template|text|message|instructions?|context)(_|$)")
#: `$ref` targets resolved against the schema's own definitions.
_REF = re.compile(r"^#/(?:definitions|\$defs|components/schemas)/([^/]+)$")
_INTEGER_TEXT = re.compile(r"^[+-]?\d+$")


class Control(enum.StrEnum):
    """The control a field is shown with."""

    TEXT = "text"
    TEXTAREA = "textarea"
    NUMBER = "number"
    #: A range slider and a number box showing the same value (both bounds are known).
    SLIDER = "slider"
    CHECKBOX = "checkbox"
    SELECT = "select"
    #: A URL box with a file picker that uploads the file and fills in its URL.
    FILE = "file"
    #: An array of strings: one item per line (or a JSON array for items with line breaks).
    LIST = "list"
    #: Anything else (objects, arrays of non-strings, untyped): JSON text.
    JSON = "json"


@attrs.frozen
class Option:
    value: Any

    @property
    def form_value(self) -> str:
        return self.value if isinstance(self.value, str) else json.dumps(self.value)

    @property
    def label(self) -> str:
        return self.form_value


@attrs.frozen(kw_only=True)
class FormField:
    name: str
    label: str
    help: str
    control: Control
    #: The JSON type the field's value is sent as.
    type: str
    required: bool
    has_default: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    #: The slider's step; number boxes take any value (integers: whole numbers).
    step: str = "any"
    options: tuple[Option, ...] = ()

    @property
    def id(self) -> str:
        return f"field-{self.name}"

    @property
    def initial(self) -> str:
        """What the control shows before anyone types: the default, or nothing."""
        return self.form_value(self.default) if self.has_default else ""

    def form_value(self, value: Any) -> str:
        """A JSON value as the text this field's control holds."""
        if value is None:
            return ""
        match self.control:
            case Control.CHECKBOX:
                return "true" if value is True else "false"
            case Control.LIST if isinstance(value, list) and all(
                isinstance(v, str) and "\n" not in v for v in value
            ):
                return "\n".join(value)
            case Control.LIST | Control.JSON:
                return json.dumps(value, indent=2, ensure_ascii=False)
            case _ if isinstance(value, str):
                return value
            case _:
                return json.dumps(value)

    @property
    def bounds_text(self) -> str:
        """The default and bounds in words, shown under the description."""
        parts = []
        if self.minimum is not None and self.maximum is not None:
            parts.append(f"From {_number(self.minimum)} to {_number(self.maximum)}.")
        elif self.minimum is not None:
            parts.append(f"At least {_number(self.minimum)}.")
        elif self.maximum is not None:
            parts.append(f"At most {_number(self.maximum)}.")
        if self.has_default and self.control not in (Control.TEXTAREA, Control.CHECKBOX):
            shown = self.form_value(self.default)
            if shown and "\n" not in shown and len(shown) <= 80:
                parts.append(f"Default: {shown}.")
        if self.control is Control.LIST:
            parts.append("One item per line, or a JSON array of strings.")
        return " ".join(parts)


def _number(value: float) -> str:
    return json.dumps(int(value) if float(value).is_integer() else value)


def _resolve(prop: Mapping[str, Any], definitions: Mapping[str, Any]) -> dict[str, Any]:
    """The property with `$ref`, `allOf` and nullable `anyOf`/`oneOf` folded in.

    Cog writes enums as `allOf: [{"$ref": "#/components/schemas/<name>"}]`; pydantic writes
    optional fields as `anyOf: [{...}, {"type": "null"}]`. The property's own keys (title,
    description, default) win over the referenced ones.
    """
    merged: dict[str, Any] = {}
    ref = prop.get("$ref")
    if isinstance(ref, str):
        match = _REF.match(ref)
        target = definitions.get(match.group(1)) if match else None
        if isinstance(target, Mapping):
            merged.update(_resolve(target, definitions))
    for sub in prop.get("allOf", ()):
        if isinstance(sub, Mapping):
            merged.update(_resolve(sub, definitions))
    for key in ("anyOf", "oneOf"):
        alternatives = [s for s in prop.get(key, ()) if isinstance(s, Mapping)]
        non_null = [s for s in alternatives if s.get("type") != "null"]
        if non_null:
            merged.update(_resolve(non_null[0], definitions))
    merged.update({k: v for k, v in prop.items() if k not in ("$ref", "allOf", "anyOf", "oneOf")})
    return merged


def _json_type(prop: Mapping[str, Any]) -> str:
    declared = prop.get("type")
    if isinstance(declared, list):
        declared = next((t for t in declared if t != "null"), None)
    if isinstance(declared, str):
        return declared
    values = prop.get("enum")
    if isinstance(values, list) and values:
        first = values[0]
        if isinstance(first, bool):
            return "boolean"
        if isinstance(first, int):
            return "integer"
        if isinstance(first, float):
            return "number"
        if isinstance(first, str):
            return "string"
    return "json"


def _bound(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _slider_step(json_type: str, minimum: float, maximum: float) -> str:
    """Whole numbers for integers; else a power of ten giving about a hundred steps."""
    if json_type == "integer":
        return "1"
    span = maximum - minimum
    if span <= 0:
        return "any"
    return f"{10 ** math.floor(math.log10(span / 100)):g}"


def _control(name: str, json_type: str, prop: Mapping[str, Any]) -> Control:
    if isinstance(prop.get("enum"), list) and prop["enum"]:
        return Control.SELECT
    match json_type:
        case "boolean":
            return Control.CHECKBOX
        case "integer" | "number":
            bounded = _bound(prop.get("minimum")) is not None
            bounded = bounded and _bound(prop.get("maximum")) is not None
            return Control.SLIDER if bounded else Control.NUMBER
        case "string" if prop.get("format") == "uri":
            return Control.FILE
        case "string":
            default = prop.get("default")
            long_default = isinstance(default, str) and "\n" in default
            if _LONG_TEXT.search(name) or long_default:
                return Control.TEXTAREA
            return Control.TEXT
        case "array" if _json_type(prop.get("items") or {}) == "string":
            return Control.LIST
        case _:
            return Control.JSON


def _label(name: str, prop: Mapping[str, Any]) -> str:
    title = prop.get("title")
    if isinstance(title, str) and title.strip():
        return title.strip()
    return name.replace("_", " ").strip().capitalize() or name


def fields_for(
    schema: Mapping[str, Any], definitions: Mapping[str, Any] | None = None
) -> list[FormField]:
    """The form fields of an Input schema, in `x-order` (then declaration) order.

    `definitions` adds `$ref` targets to the schema's own `definitions`/`$defs` (for a Cog
    OpenAPI document, pass `components.schemas`).
    """
    known: dict[str, Any] = {}
    for key in ("definitions", "$defs"):
        if isinstance(schema.get(key), Mapping):
            known.update(schema[key])
    known.update(definitions or {})
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    fields: list[tuple[tuple[int, int], FormField]] = []
    for position, (name, raw) in enumerate(properties.items()):
        if not isinstance(raw, Mapping):
            continue
        prop = _resolve(raw, known)
        json_type = _json_type(prop)
        control = _control(name, json_type, prop)
        minimum, maximum = _bound(prop.get("minimum")), _bound(prop.get("maximum"))
        step = "1" if json_type == "integer" else "any"
        if control is Control.SLIDER:
            assert minimum is not None and maximum is not None
            step = _slider_step(json_type, minimum, maximum)
        options: tuple[Option, ...] = ()
        if control is Control.SELECT:
            options = tuple(Option(v) for v in prop["enum"])
        description = prop.get("description")
        field = FormField(
            name=name,
            label=_label(name, prop),
            help=description.strip() if isinstance(description, str) else "",
            control=control,
            type=json_type,
            required=name in required,
            has_default="default" in prop,
            default=prop.get("default"),
            minimum=minimum,
            maximum=maximum,
            step=step,
            options=options,
        )
        order = prop.get("x-order")
        rank = order if isinstance(order, int) and not isinstance(order, bool) else 1_000_000
        fields.append(((rank, position), field))
    return [field for _, field in sorted(fields, key=lambda item: item[0])]


@attrs.frozen
class ParsedForm:
    #: The input to send: only the fields that were filled in and differ from the default.
    input: dict[str, Any]
    #: `{"field", "message"}` for text that cannot be read as the field's type.
    errors: list[dict[str, str]]


class _Unreadable(ValueError):
    pass


_NOT_SENT = object()


def _read(field: FormField, text: str) -> Any:
    """The JSON value of one control's text, or `_NOT_SENT` for an empty control."""
    match field.control:
        case Control.CHECKBOX:
            return text in ("true", "on", "1")
        case Control.SELECT:
            if text == "":
                return _NOT_SENT
            for option in field.options:
                if option.form_value == text:
                    return option.value
            choices = ", ".join(o.form_value for o in field.options)
            raise _Unreadable(f"must be one of {choices}")
        case Control.NUMBER | Control.SLIDER:
            text = text.strip()
            if text == "":
                return _NOT_SENT
            try:
                number = float(text)
            except ValueError:
                raise _Unreadable(f"must be a number, not {text!r}") from None
            if not math.isfinite(number):
                raise _Unreadable("must be a finite number")
            if field.type == "integer":
                if not number.is_integer():
                    raise _Unreadable(f"must be a whole number, not {text}")
                return int(number)
            return int(number) if _INTEGER_TEXT.match(text) else number
        case Control.LIST:
            stripped = text.strip()
            if stripped == "":
                return _NOT_SENT
            if stripped.startswith("["):
                try:
                    items = json.loads(stripped)
                except ValueError:
                    items = None
                if isinstance(items, list) and all(isinstance(i, str) for i in items):
                    return items
            return [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
        case Control.JSON:
            if text.strip() == "":
                return _NOT_SENT
            try:
                return json.loads(text)
            except ValueError as exc:
                raise _Unreadable(f"is not valid JSON: {exc}") from None
        case _:
            # Browsers submit text areas with CRLF line breaks.
            text = text.replace("\r\n", "\n")
            if text == "" and not field.has_default:
                return _NOT_SENT
            return text


def parse_form(fields: list[FormField], form: Mapping[str, Any]) -> ParsedForm:
    """The input a submitted form asks for. `form` maps names to submitted strings.

    A field missing from `form` is not sent, except a checkbox: browsers leave unchecked
    boxes out. Values other than strings (file parts) are ignored: files reach the form as
    URLs, filled in by the file picker.
    """
    values: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for field in fields:
        raw = form.get(field.name)
        if not isinstance(raw, str) and field.control is not Control.CHECKBOX:
            continue  # not in the form (or a file part): not sent
        text = raw if isinstance(raw, str) else ""
        try:
            value = _read(field, text)
        except _Unreadable as exc:
            errors.append({"field": field.name, "message": str(exc)})
            continue
        if value is _NOT_SENT:
            continue
        if field.has_default and _same(value, field.default):
            continue
        unset_checkbox = field.control is Control.CHECKBOX and not field.has_default
        if unset_checkbox and not value and not field.required:
            # Unchecked with no default: leave it unset (the schema needs no value).
            continue
        values[field.name] = value
    return ParsedForm(input=values, errors=errors)


def _same(value: Any, default: Any) -> bool:
    # `True == 1` in Python; the types must match too (1 and 1.0 are the same number).
    if isinstance(value, bool) != isinstance(default, bool):
        return False
    return bool(value == default)


def form_values(fields: list[FormField], input: Mapping[str, Any]) -> dict[str, str]:
    """The control texts that show `input` (to run a prediction again with its input)."""
    return {f.name: f.form_value(input[f.name]) for f in fields if f.name in input}
