"""Safe HTML building (`server.web.html`): what is not Markup is escaped, everywhere."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.web.html import Markup, attrs_markup, escape, join, render, safe_link_url


def test_values_are_escaped_in_text_and_quoted_attributes() -> None:
    out = render(
        '<a href="{href}" title="{title}">{text}</a>',
        href="/x?a=1&b=2",
        title='say "hi"',
        text="<b>&</b>",
    )
    assert out == '<a href="/x?a=1&amp;b=2" title="say &quot;hi&quot;">&lt;b&gt;&amp;&lt;/b&gt;</a>'
    assert isinstance(out, Markup)
    assert render("'{v}'", v="it's") == "'it&#x27;s'"


def test_markup_passes_through_and_concatenation_stays_safe() -> None:
    inner = render("<em>{v}</em>", v="<x>")
    assert render("<p>{inner}</p>", inner=inner) == "<p><em>&lt;x&gt;</em></p>"
    assert inner + "<y>" == "<em>&lt;x&gt;</em>&lt;y&gt;"
    assert "<y>" + inner == "&lt;y&gt;<em>&lt;x&gt;</em>"
    assert isinstance(inner + "<y>", Markup) and isinstance("<y>" + inner, Markup)
    assert join(["<a>", inner], "<br>") == "&lt;a&gt;&lt;br&gt;<em>&lt;x&gt;</em>"
    assert escape(inner) is inner


def test_format_specs_are_escaped_too() -> None:
    assert render("{v:>5}", v="<") == "    &lt;"


def test_attributes() -> None:
    assert attrs_markup(id="a<b", required=True, hidden=False, for_="x", aria_label=None) == (
        ' id="a&lt;b" required for="x"'
    )
    assert attrs_markup(aria_describedby="h e") == ' aria-describedby="h e"'


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://example.com/a.png", True),
        ("http://example.com", True),
        ("data:image/png;base64,AAAA", True),
        ("data:text/html,<script>", False),
        ("javascript:alert(1)", False),
        ("JaVaScRiPt:alert(1)", False),
        (" javascript:alert(1)", False),
        ("vbscript:x", False),
        ("/relative", False),
        ("http://[::1", False),
    ],
)
def test_only_safe_urls_become_links(url: str, allowed: bool) -> None:
    assert (safe_link_url(url) is not None) is allowed


@given(st.text())
def test_no_text_survives_as_markup(text: str) -> None:
    out = render("<p>{t}</p><i title='{t}'></i>", t=text)
    body = out[len("<p>") : out.index("</p>")]
    assert "<" not in body and ">" not in body and '"' not in body and "'" not in body
