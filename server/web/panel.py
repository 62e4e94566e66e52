"""The HTML of a prediction: status, output, error, logs, input, metrics and timestamps.

The same panel is on the prediction's page, under a model's form once it runs, and is what
the page's script fetches (`/web/api/predictions/{id}/panel`) to show a change. Model
output is untrusted: it is escaped like everything else, and only http(s) URLs and data:
images become links or images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from models.catalog import ModelEntry
from server.records import Prediction, format_time
from server.web.html import Markup, attrs_markup, join, render, safe_link_url

#: Data URIs and other long values are cut to this many characters in the input list.
_SHOWN_VALUE = 2000


def _concatenates(entry: ModelEntry | None) -> bool:
    if entry is None:
        return True
    output = entry.schema.output
    return output.get("x-cog-array-display") == "concatenate" or output.get("type") == "string"


def output_html(output: Any, *, concatenate: bool) -> Markup:
    """A prediction's output: text, links to files, or JSON."""
    if output is None:
        return Markup("")
    if isinstance(output, list) and all(isinstance(item, str) for item in output):
        if concatenate:
            return render('<pre class="output-text">{text}</pre>', text="".join(output))
        return render(
            '<ol class="output-list">{items}</ol>',
            items=join(render("<li>{item}</li>", item=_value_html(i)) for i in output),
        )
    if isinstance(output, str):
        return (
            render('<pre class="output-text">{text}</pre>', text=output)
            if not safe_link_url(output)
            else _value_html(output)
        )
    return render(
        '<pre class="output-text">{text}</pre>',
        text=json.dumps(output, indent=2, ensure_ascii=False),
    )


def _value_html(value: str) -> Markup:
    url = safe_link_url(value)
    if url is None:
        return render("{value}", value=value)
    if url.startswith("data:image/"):
        return render('<img class="output-image" src="{url}" alt="Output image">', url=url)
    return render('<a href="{url}" rel="noopener noreferrer">{url}</a>', url=url)


def _input_value(value: Any) -> Markup:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    if len(text) > _SHOWN_VALUE:
        text = f"{text[:_SHOWN_VALUE]}… ({len(text)} characters)"
    return render('<pre class="value">{text}</pre>', text=text)


def _metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def time_html(value: Any) -> Markup:
    text = format_time(value)
    if text is None:
        return render('<span class="muted">—</span>')
    shown = f"{text[:10]} {text[11:19]} UTC"
    return render('<time datetime="{iso}">{shown}</time>', iso=text, shown=shown)


def prediction_panel(
    prediction: Prediction, entry: ModelEntry | None, wire: Mapping[str, Any]
) -> Markup:
    """The live part of a prediction page; the page's script swaps it in when it changes."""
    p = prediction
    running = not p.status.terminal
    inputs = join(
        render("<dt>{name}</dt><dd>{value}</dd>", name=name, value=_input_value(value))
        for name, value in p.input.items()
    ) or render('<dd class="muted">(empty)</dd>')
    metrics = join(
        render("<dt>{name}</dt><dd>{value}</dd>", name=name, value=_metric(value))
        for name, value in sorted(p.metrics.items())
    )
    times = join(
        render("<dt>{label}</dt><dd>{value}</dd>", label=label, value=time_html(value))
        for label, value in (
            ("Created", p.created_at),
            ("Started", p.started_at),
            ("Completed", p.completed_at),
        )
    )
    cancel = render(
        '<form class="cancel-form" method="post" action="/predictions/{id}/cancel">'
        '<button type="submit" class="danger" data-action="cancel">Cancel</button></form>',
        id=p.id,
    )
    stream = wire["urls"].get("stream") if running else None
    return render(
        """<article class="prediction" id="prediction" data-id="{id}" data-status="{status}"
 data-stream="{stream}" data-terminal="{terminal}" aria-labelledby="prediction-heading">
<div class="prediction-head">
<h2 id="prediction-heading" tabindex="-1">Prediction
<a href="/predictions/{id}"><code>{id}</code></a></h2>
<p class="status-line">Status: <span class="status status-{status}" id="prediction-status"
 role="status">{status}</span></p>
{cancel}
</div>
<p class="meta">{model} · {source} · <a href="/models/{model}?from={id}">Run again with this
input</a></p>
<section aria-labelledby="output-heading-{id}">
<h3 id="output-heading-{id}">Output</h3>
<div class="output" id="prediction-output" aria-live="polite" aria-busy="{busy}">{output}</div>
</section>
<div class="error-box" id="prediction-error" role="alert"{error_hidden}>{error}</div>
<details class="logs"{logs_open}><summary>Logs</summary>
<pre id="prediction-logs" class="logs-text">{logs}</pre></details>
<div class="details">
<section aria-labelledby="input-heading-{id}"><h3 id="input-heading-{id}">Input</h3>
<dl class="kv">{inputs}</dl></section>
<section aria-labelledby="metrics-heading-{id}"><h3 id="metrics-heading-{id}">Metrics</h3>
<dl class="kv">{metrics}</dl></section>
<section aria-labelledby="times-heading-{id}"><h3 id="times-heading-{id}">Timestamps</h3>
<dl class="kv">{times}</dl></section>
</div>
</article>""",
        id=p.id,
        status=str(p.status),
        stream=stream or "",
        terminal="true" if not running else "false",
        cancel=cancel if running else Markup(""),
        model=p.model,
        source=p.source,
        busy="true" if running else "false",
        output=output_html(p.output, concatenate=_concatenates(entry)),
        error_hidden=attrs_markup(hidden=not p.error),
        error=p.error or "",
        logs_open=attrs_markup(open=bool(p.logs)),
        logs=p.logs,
        inputs=inputs,
        metrics=metrics or render('<dd class="muted">(none yet)</dd>'),
        times=times,
    )
