"""Safe HTML building: every value is escaped unless it is already `Markup`.

The playground renders its pages with `render(template, **values)`, a `str.format` whose
fields are HTML-escaped (quotes included, so they are safe in quoted attributes). Only
`Markup` passes through unchanged, and only this module and `render` make `Markup`, so model
output, inputs, schema descriptions and error messages can never become markup by accident.
"""

from __future__ import annotations

import html
import string
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit


class Markup(str):
    """Text that is already HTML (the result of `render`, `escape` or `join`)."""

    __slots__ = ()

    def __add__(self, other: str) -> Markup:
        return Markup(str.__add__(self, escape(other)))

    def __radd__(self, other: str) -> Markup:
        return Markup(str.__add__(escape(other), self))


def escape(value: Any) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        return escape(format(value, format_spec) if format_spec else value)


_FORMATTER = _Formatter()


def render(template: str, /, **values: Any) -> Markup:
    """`template.format(**values)` with every value escaped (templates must quote attributes)."""
    return Markup(_FORMATTER.vformat(template, (), values))


def join(parts: Iterable[Any], separator: str = "") -> Markup:
    return Markup(escape(separator).join(escape(p) for p in parts))


def attrs_markup(**attributes: str | int | float | bool | None) -> Markup:
    """` name="value"` pairs; True is a bare attribute, None and False are left out.

    A trailing underscore is dropped (`for_=`) and other underscores become dashes
    (`aria_describedby=`).
    """
    parts = []
    for raw_name, value in attributes.items():
        name = raw_name.rstrip("_").replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(render(" {name}", name=name))
        else:
            parts.append(render(' {name}="{value}"', name=name, value=value))
    return join(parts)


def safe_link_url(value: str) -> str | None:
    """`value` if it may be a link target in the page (http, https, or a data: image), else None.

    Model output is untrusted: a `javascript:` URL must never become an `href`.
    """
    try:
        scheme = urlsplit(value).scheme.lower()
    except ValueError:
        return None
    if scheme in ("http", "https"):
        return value
    if scheme == "data" and value[5:].lower().startswith("image/"):
        return value
    return None
