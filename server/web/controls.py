"""The HTML of one form field: its label, control, help text and error message.

`form_field` renders what `server.web.forms` decided for a field (a text area, a slider
with its number box, a select, a URL box with a file picker, ...). Every value is escaped
by `server.web.html.render`.
"""

from __future__ import annotations

import json

from server.web.forms import Control, FormField
from server.web.html import Markup, attrs_markup, join, render


def _field_control(field: FormField, value: str, described: str, invalid: bool) -> Markup:
    common = attrs_markup(
        id=field.id,
        name=field.name,
        required=field.required,
        aria_describedby=described or None,
        aria_invalid="true" if invalid else None,
    )
    match field.control:
        case Control.TEXTAREA | Control.LIST | Control.JSON:
            rows = 5 if field.name == "prompt" else 3
            mono = " mono" if field.control is not Control.TEXTAREA else ""
            return render(
                '<textarea{common} rows="{rows}" class="{cls}" spellcheck="{spell}">{value}'
                "</textarea>",
                common=common,
                rows=rows,
                cls=f"control{mono}",
                spell="true" if field.control is Control.TEXTAREA else "false",
                value=value,
            )
        case Control.NUMBER:
            return render(
                '<input type="number" class="control"{common}{bounds} value="{value}">',
                common=common,
                bounds=_number_attrs(field, field.step),
                value=value,
            )
        case Control.SLIDER:
            return render(
                '<div class="slider">'
                '<input type="range" id="{id}-range" data-sync="{id}" aria-label="{label} slider"'
                '{bounds} value="{range_value}" aria-describedby="{described}">'
                '<input type="number" class="control"{common}{box} value="{value}">'
                "</div>",
                id=field.id,
                label=field.label,
                bounds=_number_attrs(field, field.step),
                box=_number_attrs(field, "1" if field.type == "integer" else "any"),
                described=described,
                common=common,
                range_value=value or (field.minimum if field.minimum is not None else ""),
                value=value,
            )
        case Control.CHECKBOX:
            return render(
                '<input type="checkbox" value="true"{common}{checked}>',
                common=common,
                checked=attrs_markup(checked=value == "true"),
            )
        case Control.SELECT:
            placeholder = Markup("")
            if not field.has_default:
                text = "Choose…" if field.required else "(not set)"
                placeholder = render('<option value="">{text}</option>', text=text)
            options = join(
                render(
                    '<option value="{value}"{selected}>{label}</option>',
                    value=option.form_value,
                    label=option.label,
                    selected=attrs_markup(selected=option.form_value == value),
                )
                for option in field.options
            )
            return render(
                '<select class="control"{common}>{placeholder}{options}</select>',
                common=common,
                placeholder=placeholder,
                options=options,
            )
        case Control.FILE:
            return render(
                '<input type="url" class="control"{common} value="{value}" '
                'placeholder="https://… or choose a file" inputmode="url" spellcheck="false">'
                '<div class="upload"><label class="file-label" for="{id}-file">Choose a file for '
                "{label}</label>"
                '<input type="file" id="{id}-file" data-upload-for="{id}">'
                '<span class="upload-status" id="{id}-upload" aria-live="polite"></span></div>',
                common=common,
                value=value,
                id=field.id,
                label=field.label,
            )
        case _:
            return render(
                '<input type="text" class="control"{common} value="{value}" spellcheck="false">',
                common=common,
                value=value,
            )


def _number_attrs(field: FormField, step: str) -> Markup:
    return attrs_markup(
        min=_plain(field.minimum), max=_plain(field.maximum), step=step, inputmode="decimal"
    )


def _plain(number: float | None) -> str | None:
    if number is None:
        return None
    return json.dumps(int(number) if float(number).is_integer() else number)


def form_field(field: FormField, value: str, error: str | None) -> Markup:
    """One field: label (marked when required), control, help text and its error."""
    described = []
    help_text = " ".join(text for text in (field.help, field.bounds_text) if text)
    if help_text:
        described.append(f"{field.id}-help")
    described.append(f"{field.id}-error")
    required = Markup(' <span class="required">(required)</span>') if field.required else Markup("")
    label = render(
        '<label for="{id}">{label}{required}</label>',
        id=field.id,
        label=field.label,
        required=required,
    )
    control = _field_control(field, value, " ".join(described), error is not None)
    if field.control is Control.CHECKBOX:
        top = render('<div class="check">{control}{label}</div>', control=control, label=label)
    else:
        top = label + control
    help_html = (
        render('<p class="help" id="{id}-help">{text}</p>', id=field.id, text=help_text)
        if help_text
        else Markup("")
    )
    return render(
        '<div class="field field-{control}" data-field="{name}">{top}{help}'
        '<p class="field-error" id="{id}-error"{hidden}>{error}</p></div>',
        control=str(field.control),
        name=field.name,
        top=top,
        help=help_html,
        id=field.id,
        hidden=attrs_markup(hidden=error is None),
        error=error or "",
    )
