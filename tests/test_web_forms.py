"""The schema-to-form mapping (`server.web.forms`): every type in the seed schemas, plus enums."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.catalog import SCHEMAS_DIR, load_schema
from server.validation import InputValidator
from server.web.forms import Control, FormField, fields_for, form_values, parse_form

SEEDS = sorted(SCHEMAS_DIR.glob("*.json"))


def seed(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS_DIR / f"{name}.json").read_text())["Input"]
    return schema


def by_name(fields: list[FormField]) -> dict[str, FormField]:
    return {f.name: f for f in fields}


SMOL = by_name(fields_for(seed("huggingfacetb__smollm2-135m-instruct")))
LLAVA = by_name(fields_for(seed("yorickvp__llava-v1.6-34b")))
MINIGPT = by_name(fields_for(seed("daanelson__minigpt-4")))

#: A schema with the enum forms the seeds lack: inline, Cog's allOf + $ref, and nullable.
ENUMS: dict[str, Any] = {
    "type": "object",
    "required": ["style"],
    "properties": {
        "style": {
            "type": "string",
            "title": "Style",
            "description": "How the answer reads.",
            "enum": ["plain", "formal", "pirate"],
            "x-order": 0,
        },
        "voice": {
            "title": "Voice",
            "default": "b",
            "allOf": [{"$ref": "#/components/schemas/voice"}],
            "x-order": 1,
        },
        "beams": {"type": "integer", "enum": [1, 2, 4], "default": 1, "x-order": 2},
        "mood": {
            "anyOf": [{"type": "string", "enum": ["calm", "wild"]}, {"type": "null"}],
            "x-order": 3,
        },
        "extra": {"type": "object", "x-order": 4},
    },
}
COMPONENTS = {"voice": {"title": "voice", "type": "string", "enum": ["a", "b"]}}


def test_prompt_is_a_required_text_area_first() -> None:
    prompt = SMOL["prompt"]
    assert prompt.control is Control.TEXTAREA
    assert prompt.required and prompt.label == "Prompt"
    assert prompt.help == "Prompt to send to the model."
    assert not prompt.has_default and prompt.initial == ""
    assert SMOL["system_prompt"].control is Control.TEXTAREA
    assert SMOL["prompt_template"].control is Control.TEXTAREA
    assert not SMOL["system_prompt"].required


def test_plain_string_is_a_text_box_with_its_default() -> None:
    stops = SMOL["stop_sequences"]
    assert stops.control is Control.TEXT
    assert stops.initial == "<|im_end|>,<|endoftext|>"
    assert "Default: <|im_end|>,<|endoftext|>." in stops.bounds_text


def test_bounded_integer_is_a_slider_with_whole_steps() -> None:
    beams = MINIGPT["num_beams"]
    assert beams.control is Control.SLIDER
    assert (beams.minimum, beams.maximum, beams.step, beams.initial) == (1, 10, "1", "3")
    assert beams.bounds_text == "From 1 to 10. Default: 3."


def test_bounded_number_is_a_slider_of_about_a_hundred_steps() -> None:
    temperature = SMOL["temperature"]
    assert temperature.control is Control.SLIDER
    assert (temperature.minimum, temperature.maximum) == (0, 5)
    assert temperature.step == "0.01" and temperature.initial == "0.7"
    assert SMOL["top_p"].step == "0.01"
    assert MINIGPT["temperature"].minimum == 0.01


def test_half_bounded_and_unbounded_numbers_are_number_boxes() -> None:
    assert SMOL["max_tokens"].control is Control.NUMBER
    assert SMOL["max_tokens"].minimum == 1 and SMOL["max_tokens"].maximum is None
    assert SMOL["max_tokens"].step == "1"
    assert SMOL["max_tokens"].bounds_text == "At least 1. Default: 512."
    assert SMOL["presence_penalty"].control is Control.NUMBER
    assert SMOL["presence_penalty"].step == "any"
    assert SMOL["seed"].control is Control.NUMBER and SMOL["seed"].initial == ""


def test_boolean_is_a_checkbox() -> None:
    metrics = SMOL["log_performance_metrics"]
    assert metrics.control is Control.CHECKBOX
    assert metrics.initial == "false"


def test_uri_is_a_file_picker_and_string_array_a_list() -> None:
    assert LLAVA["image"].control is Control.FILE
    assert MINIGPT["image"].required and MINIGPT["image"].control is Control.FILE
    history = LLAVA["history"]
    assert history.control is Control.LIST and history.type == "array"
    assert "One item per line" in history.bounds_text


def test_enums_are_selects_in_every_spelling() -> None:
    fields = by_name(fields_for(ENUMS, COMPONENTS))
    style = fields["style"]
    assert style.control is Control.SELECT and style.required
    assert [o.value for o in style.options] == ["plain", "formal", "pirate"]
    voice = fields["voice"]
    # Cog's `allOf: [{$ref}]`: the referenced enum, the property's own title and default.
    assert voice.control is Control.SELECT and voice.label == "Voice"
    assert [o.value for o in voice.options] == ["a", "b"] and voice.initial == "b"
    beams = fields["beams"]
    assert beams.type == "integer" and [o.form_value for o in beams.options] == ["1", "2", "4"]
    mood = fields["mood"]
    assert mood.control is Control.SELECT and mood.type == "string" and not mood.has_default
    assert fields["extra"].control is Control.JSON
    # An unresolvable reference is not an enum.
    assert fields_for(ENUMS)[1].control is Control.JSON


def test_x_order_then_declaration_order() -> None:
    schema = {
        "properties": {
            "c": {"type": "string"},
            "b": {"type": "string", "x-order": 1},
            "a": {"type": "string", "x-order": 0},
            "d": {"type": "string"},
        }
    }
    assert [f.name for f in fields_for(schema)] == ["a", "b", "c", "d"]
    assert [f.name for f in fields_for(seed("yorickvp__llava-v1.6-34b"))] == [
        "image",
        "prompt",
        "top_p",
        "temperature",
        "max_tokens",
        "history",
    ]


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.stem)
def test_every_seed_field_gets_a_real_control(path: Path) -> None:
    """No seed input falls back to raw JSON, and the untouched form sends nothing."""
    schema = load_schema(path)
    fields = fields_for(schema.input)
    assert [f.name for f in fields] == sorted(
        schema.input["properties"], key=lambda n: schema.input["properties"][n]["x-order"]
    )
    for field in fields:
        assert field.control is not Control.JSON, field.name
        assert field.label and field.help, field.name
    untouched = {f.name: f.initial for f in fields if f.control is not Control.CHECKBOX}
    assert parse_form(fields, untouched).input == {}


def test_parse_sends_only_what_changed() -> None:
    fields = fields_for(seed("huggingfacetb__smollm2-135m-instruct"))
    form = {f.name: f.initial for f in fields if f.control is not Control.CHECKBOX}
    form.update(
        prompt="Hi\r\nthere",
        temperature="0",
        max_tokens="24",
        top_p="0.95",  # the default: not sent
        seed="",  # empty without default: not sent
        log_performance_metrics="true",
    )
    parsed = parse_form(fields, form)
    assert parsed.errors == []
    assert parsed.input == {
        "prompt": "Hi\nthere",
        "temperature": 0,
        "max_tokens": 24,
        "log_performance_metrics": True,
    }
    assert type(parsed.input["temperature"]) is int
    # The result passes the model's own validator.
    InputValidator(load_schema(SCHEMAS_DIR / "huggingfacetb__smollm2-135m-instruct.json")).validate(
        parsed.input
    )


def test_parse_types() -> None:
    fields = fields_for(ENUMS, COMPONENTS) + fields_for(seed("yorickvp__llava-v1.6-34b"))
    parsed = parse_form(
        fields,
        {
            "style": "pirate",
            "voice": "a",
            "beams": "4",
            "mood": "",
            "extra": '{"k": [1, 2]}',
            "image": "data:image/png;base64,AAAA",
            "prompt": "describe",
            "top_p": "0.5",
            "temperature": "1.5e-1",
            "history": "hello\n\nhi <image>\r\n",
        },
    )
    assert parsed.errors == []
    assert parsed.input == {
        "style": "pirate",
        "voice": "a",
        "beams": 4,
        "extra": {"k": [1, 2]},
        "image": "data:image/png;base64,AAAA",
        "prompt": "describe",
        "top_p": 0.5,
        "temperature": 0.15,
        "history": ["hello", "hi <image>"],
    }
    as_json = parse_form(fields, {"history": '["line one\\nline two", "next"]'})
    assert as_json.input["history"] == ["line one\nline two", "next"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("max_tokens", "many", "must be a number, not 'many'"),
        ("max_tokens", "2.5", "must be a whole number, not 2.5"),
        ("temperature", "nan", "must be a finite number"),
        ("temperature", "inf", "must be a finite number"),
    ],
)
def test_unreadable_numbers_name_the_field(name: str, text: str, message: str) -> None:
    parsed = parse_form(list(SMOL.values()), {"prompt": "x", name: text})
    assert parsed.errors == [{"field": name, "message": message}]
    assert name not in parsed.input and parsed.input["prompt"] == "x"


def test_unreadable_select_and_json() -> None:
    parsed = parse_form(fields_for(ENUMS, COMPONENTS), {"style": "loud", "extra": "{nope"})
    fields = [e["field"] for e in parsed.errors]
    assert fields == ["style", "extra"]
    assert parsed.errors[0]["message"] == "must be one of plain, formal, pirate"
    assert parsed.errors[1]["message"].startswith("is not valid JSON")


def test_checkboxes() -> None:
    schema = {
        "required": ["must"],
        "properties": {
            "off": {"type": "boolean", "default": False},
            "on": {"type": "boolean", "default": True},
            "maybe": {"type": "boolean"},
            "must": {"type": "boolean"},
        },
    }
    fields = fields_for(schema)
    # Unchecked boxes are not in a submitted form.
    assert parse_form(fields, {}).input == {"on": False, "must": False}
    checked = {"off": "true", "on": "true", "maybe": "true", "must": "true"}
    assert parse_form(fields, checked).input == {"off": True, "maybe": True, "must": True}


def test_clearing_a_text_with_a_default_sends_it_empty() -> None:
    parsed = parse_form([SMOL["stop_sequences"]], {"stop_sequences": ""})
    assert parsed.input == {"stop_sequences": ""}


def test_form_values_show_an_earlier_input() -> None:
    fields = [*SMOL.values(), LLAVA["history"]]
    earlier = {
        "prompt": "again",
        "temperature": 0.25,
        "log_performance_metrics": True,
        "history": ["a", "b"],
        "unknown": 1,
    }
    values = form_values(fields, earlier)
    assert values == {
        "prompt": "again",
        "temperature": "0.25",
        "log_performance_metrics": "true",
        "history": "a\nb",
    }
    assert LLAVA["history"].form_value(["two\nlines"]) == '[\n  "two\\nlines"\n]'


@given(
    prompt=st.text(st.characters(blacklist_characters="\r", blacklist_categories=["Cs"])),
    max_tokens=st.integers(1, 4096),
    temperature=st.floats(0, 5, allow_nan=False),
    top_k=st.integers(-1, 100),
    metrics=st.booleans(),
    stops=st.text(st.characters(blacklist_characters="\r", blacklist_categories=["Cs"])),
)
def test_an_input_survives_the_form(
    prompt: str, max_tokens: int, temperature: float, top_k: int, metrics: bool, stops: str
) -> None:
    """Shown in the form and submitted again, an input comes back as itself (minus the
    values that equal the defaults, and an empty prompt, which is then left out)."""
    fields = list(SMOL.values())
    sent = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "log_performance_metrics": metrics,
        "stop_sequences": stops,
    }
    form = {f.name: f.initial for f in fields if f.control is not Control.CHECKBOX}
    form.update(form_values(fields, sent))
    if not metrics:
        form.pop("log_performance_metrics")
    parsed = parse_form(fields, form)
    assert parsed.errors == []
    expected = {
        name: value
        for name, value in sent.items()
        if not (SMOL[name].has_default and value == SMOL[name].default)
        and not (name == "prompt" and value == "")
    }
    assert parsed.input == expected
