"""The playground's pages, rendered with `server.web.html.render` (every value escaped).

Each function returns `Markup`; `layout` wraps a page body in the shared document. Nothing
here reads the request or the app: routes pass in what a page shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlencode

import attrs

from models.catalog import ModelEntry
from server.records import Prediction
from server.web.controls import form_field
from server.web.forms import FormField
from server.web.html import Markup, attrs_markup, join, render
from server.web.panel import time_html


@attrs.frozen(kw_only=True)
class PageContext:
    """What every page's frame needs."""

    css_url: str
    js_url: str
    signed_in: bool
    #: Which nav entry is the current page: "models", "predictions" or "".
    section: str = ""


_NAV = (("models", "/", "Models"), ("predictions", "/predictions", "Predictions"))
_NOTHING = Markup("")


def layout(ctx: PageContext, title: str, body: Markup, *, head: Markup = _NOTHING) -> Markup:
    nav = join(
        render(
            '<a href="{href}"{current}>{text}</a>',
            href=href,
            text=text,
            current=attrs_markup(aria_current="page" if ctx.section == key else None),
        )
        for key, href, text in _NAV
    )
    sign_out = (
        Markup(
            '<form class="sign-out" method="post" action="/logout">'
            '<button type="submit" class="link-button">Sign out</button></form>'
        )
        if ctx.signed_in
        else _NOTHING
    )
    return render(
        """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<link rel="icon" href="data:,">
<title>{title} · replicant</title>
<link rel="stylesheet" href="{css}">
<script type="module" src="{js}"></script>
{head}
</head>
<body>
<a class="skip-link" href="#main">Skip to content</a>
<header class="site-header">
<a class="brand" href="/">replicant</a>
<nav aria-label="Main">{nav}</nav>
{sign_out}
</header>
<main id="main" tabindex="-1">
{body}
</main>
</body>
</html>
""",
        title=title,
        css=ctx.css_url,
        js=ctx.js_url,
        head=head,
        nav=nav,
        sign_out=sign_out,
        body=body,
    )


# -- signing in ------------------------------------------------------------------------------


def login_page(ctx: PageContext, *, next_path: str, error: str | None = None) -> Markup:
    error_html = (
        render('<p class="error" id="login-error" role="alert">{error}</p>', error=error)
        if error
        else _NOTHING
    )
    described = "token-help login-error" if error else "token-help"
    body = render(
        """<section class="card narrow" aria-labelledby="login-heading">
<h1 id="login-heading">Sign in</h1>
<p>The playground runs this server's models from the browser. Sign in with one of the
server's API tokens: the browser keeps a session cookie, never the token.</p>
{error}
<form class="login" method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label for="token">API token</label>
<input id="token" name="token" type="password" required autocomplete="current-password"
 spellcheck="false" aria-describedby="{described}"{invalid}>
<p class="help" id="token-help">The token printed when the server first started (kept in
<code>api-token</code> in its data directory), or one from <code>REPLICANT_API_TOKENS</code>.</p>
<button type="submit" class="primary">Sign in</button>
</form>
</section>""",
        error=error_html,
        next=next_path,
        described=described,
        invalid=attrs_markup(aria_invalid="true" if error else None),
    )
    return layout(attrs.evolve(ctx, signed_in=False), "Sign in", body)


def continue_page(ctx: PageContext, path: str) -> Markup:
    """Reloads `path` from this site, so the browser sends its SameSite=Strict cookie.

    A link followed from another site arrives without that cookie; the page's own reload is
    a same-site navigation and carries it.
    """
    head = render('<meta http-equiv="refresh" content="0">')
    body = render(
        '<p class="card narrow">Opening <a href="{path}">{path}</a>…</p>',
        path=path,
    )
    return layout(ctx, "Opening…", body, head=head)


def message_page(ctx: PageContext, title: str, detail: str) -> Markup:
    body = render(
        '<section class="card narrow"><h1>{title}</h1><p>{detail}</p>'
        '<p><a href="/">Back to the models</a></p></section>',
        title=title,
        detail=detail,
    )
    return layout(ctx, title, body)


# -- models ----------------------------------------------------------------------------------


def models_page(ctx: PageContext, entries: Sequence[tuple[ModelEntry, str, int]]) -> Markup:
    """`entries`: each model with its state in words and its number of predictions."""
    items = join(
        render(
            """<li class="card model-card">
<h2><a href="/models/{owner}/{name}">{ref}</a></h2>
<p class="description">{description}</p>
<p class="meta"><span class="state state-{state_class}">{state}</span> · {runs}</p>
</li>""",
            owner=entry.owner,
            name=entry.name,
            ref=entry.ref,
            description=entry.description or "No description.",
            state=state,
            state_class=state.split()[0].lower(),
            runs=f"{runs} prediction{'s' if runs != 1 else ''}",
        )
        for entry, state, runs in entries
    )
    body = render(
        '<h1>Models</h1>\n<p class="lead">Pick a model to run it from a form made from its '
        'input schema.</p>\n<ul class="model-list">{items}</ul>',
        items=items,
    )
    return layout(attrs.evolve(ctx, section="models"), "Models", body)


def model_page(
    ctx: PageContext,
    entry: ModelEntry,
    fields: Sequence[FormField],
    *,
    values: Mapping[str, str] | None = None,
    errors: Sequence[Mapping[str, str]] = (),
    problem: str | None = None,
    state: str = "",
) -> Markup:
    """The playground of one model: its generated form and, once run, the live prediction.

    `values` are control texts to show instead of the defaults (a resubmitted form, or the
    input of an earlier prediction); fields missing from it show their defaults.
    """
    by_field = {e["field"]: e["message"] for e in errors}
    shown = values or {}
    rendered = join(
        form_field(f, shown.get(f.name, f.initial), by_field.get(f.name)) for f in fields
    )
    # Errors the fields cannot show (the input as a whole, unknown fields) go in the summary.
    names = {f.name for f in fields}
    other = [f"{e['field']}: {e['message']}" for e in errors if e["field"] not in names]
    summary_lines = ([problem] if problem else []) + other
    if errors and not summary_lines:
        summary_lines = ["Some fields need another value; see the messages below them."]
    summary = render(
        '<div class="form-errors" id="form-errors" role="alert" tabindex="-1"{hidden}>{text}</div>',
        hidden=attrs_markup(hidden=not summary_lines),
        text=join(render("<p>{line}</p>", line=line) for line in summary_lines),
    )
    body = render(
        """<nav class="breadcrumb" aria-label="Breadcrumb"><a href="/">Models</a> /
<span aria-current="page">{ref}</span></nav>
<h1>{ref}</h1>
<p class="lead">{description}</p>
{state}
<div class="playground">
<section class="card" aria-labelledby="input-heading">
<h2 id="input-heading">Input</h2>
<form id="prediction-form" class="prediction-form" method="post" action="/models/{owner}/{name}"
 data-api="/web/api/models/{owner}/{name}/predictions">
{summary}
<p class="help">Fields marked (required) must be filled in; the others start at the model's
defaults, and only the ones you change are sent.</p>
{fields}
<div class="actions">
<button type="reset" class="secondary">Reset</button>
<button type="submit" class="primary" id="run-button">Run</button>
</div>
</form>
</section>
<section class="card output-card" aria-labelledby="result-heading" id="result">
<h2 id="result-heading">Output</h2>
<p class="empty" id="result-empty">Run the model to see its output stream in here.</p>
</section>
</div>""",
        ref=entry.ref,
        owner=entry.owner,
        name=entry.name,
        description=entry.description,
        state=render('<p class="notice">{state}</p>', state=state) if state else _NOTHING,
        summary=summary,
        fields=rendered,
    )
    return layout(attrs.evolve(ctx, section="models"), entry.ref, body)


# -- predictions -----------------------------------------------------------------------------


def prediction_page(ctx: PageContext, panel: Markup, prediction: Prediction) -> Markup:
    body = render(
        '<nav class="breadcrumb" aria-label="Breadcrumb"><a href="/predictions">Predictions</a>'
        ' / <span aria-current="page">{id}</span></nav>\n'
        '<h1><a href="/models/{model}">{model}</a></h1>\n'
        '<section class="card output-card" id="result">{panel}</section>',
        id=prediction.id,
        model=prediction.model,
        panel=panel,
    )
    # Without JavaScript, a running prediction's page reloads itself to show progress.
    head = _NOTHING
    if not prediction.status.terminal:
        head = render('<noscript><meta http-equiv="refresh" content="2"></noscript>')
    title = f"Prediction {prediction.id}"
    return layout(attrs.evolve(ctx, section="predictions"), title, body, head=head)


def _preview(p: Prediction) -> str:
    value = p.input.get("prompt")
    if not isinstance(value, str):
        value = next((v for v in p.input.values() if isinstance(v, str)), "")
    value = " ".join(value.split())
    return value if len(value) <= 120 else value[:119] + "…"


def history_page(
    ctx: PageContext,
    predictions: Sequence[Prediction],
    *,
    newer: str | None,
    older: str | None,
) -> Markup:
    rows = join(
        render(
            """<li class="history-item">
<a class="history-link" href="/predictions/{id}"><code>{id}</code></a>
<span class="status status-{status}">{status}</span>
<span class="history-model">{model}</span>
<span class="history-source">{source}</span>
{created}
<span class="history-preview">{preview}</span>
</li>""",
            id=p.id,
            status=str(p.status),
            model=p.model,
            source=p.source,
            created=time_html(p.created_at),
            preview=_preview(p),
        )
        for p in predictions
    )
    links = [
        render(
            '<a rel="{rel}" href="/predictions?{query}">{text}</a>',
            rel=rel,
            text=text,
            query=urlencode({"cursor": cursor}),
        )
        for rel, text, cursor in (("prev", "← Newer", newer), ("next", "Older →", older))
        if cursor is not None
    ]
    pager = _NOTHING
    if links:
        pager = render(
            '<nav class="pager" aria-label="Pages of predictions">{links}</nav>', links=join(links)
        )
    empty = render('<p class="empty">No predictions yet. <a href="/">Run a model</a>.</p>')
    body = render(
        '<h1>Predictions</h1>\n<p class="lead">Newest first, from the API and the playground.</p>'
        "\n{list}\n{pager}",
        list=render('<ol class="history">{rows}</ol>', rows=rows) if predictions else empty,
        pager=pager,
    )
    return layout(attrs.evolve(ctx, section="predictions"), "Predictions", body)
