"""The playground's routes: HTML pages, sign-in, and the JSON calls of the pages' script.

Pages (`/`, `/models/{owner}/{name}`, `/predictions`, `/predictions/{id}`) show the sign-in
form in place until a session cookie is there. The script's calls live under `/web/api/`
and answer JSON (problem+json on errors, as the API does); they accept only the session
cookie, never a bearer token, and only from the playground's own pages (see
`server.web.sessions`). The forms also work without JavaScript: they post to the page's
own URL and are answered with a redirect.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from models.catalog import ModelEntry
from server import keys
from server.errors import ApiError, InputInvalid, NotFound
from server.http import base_url, json_response
from server.predictions import CreateRequest
from server.records import Prediction
from server.routes.files import create_file
from server.runner import RunnerState
from server.store import CursorInvalid
from server.web import templates
from server.web.appkeys import SESSIONS
from server.web.forms import FormField, fields_for, form_values, parse_form
from server.web.guards import (
    from_this_site,
    html_response,
    page,
    page_api,
    page_context,
    redirect,
    refused_cross_site,
    secure_cookies,
)
from server.web.html import Markup
from server.web.panel import prediction_panel
from server.web.sessions import clear_session_cookie, current_session, set_session_cookie

log = logging.getLogger(__name__)

#: Predictions per page of the history list.
HISTORY_PAGE_SIZE = 25
_ID = re.compile(r"^[a-z0-9]{1,64}$")


def _local_path(value: Any) -> str:
    """`value` if it is a path on this server (where to go after signing in), else `/`.

    Browsers drop tabs and line breaks from URLs and read a backslash as a slash, so a path
    holding any of them, or starting with two slashes, could lead off the server.
    """
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//"):
        return "/"
    if "\\" in value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def _entry(request: web.Request) -> ModelEntry:
    owner, name = request.match_info["owner"], request.match_info["name"]
    entry = request.app[keys.CATALOG].get(owner, name)
    if entry is None:
        raise NotFound(f"The model {owner}/{name} does not exist on this server.")
    return entry


def _fields(entry: ModelEntry) -> list[FormField]:
    return fields_for(entry.schema.input)


def _state(request: web.Request, entry: ModelEntry) -> str:
    runner = request.app[keys.RUNNERS].get(entry.ref)
    if runner is None:
        return "unavailable"
    match runner.state:
        case RunnerState.READY:
            return "ready"
        case RunnerState.STARTING:
            return "loading"
        case _:
            return f"unavailable ({runner.setup_error or runner.state})"


async def _prediction(request: web.Request, prediction_id: str | None = None) -> Prediction:
    prediction_id = prediction_id or request.match_info["id"]
    prediction = None
    if _ID.match(prediction_id):
        prediction = await request.app[keys.PREDICTIONS].get(prediction_id)
    if prediction is None:
        raise NotFound(f"Prediction {prediction_id} was not found.")
    return prediction


def _panel(request: web.Request, prediction: Prediction) -> Markup:
    owner, _, name = prediction.model.partition("/")
    entry = request.app[keys.CATALOG].get(owner, name)
    return prediction_panel(prediction, entry, prediction.to_wire(base_url(request)))


async def _create(request: web.Request, entry: ModelEntry) -> Prediction:
    """Create a prediction (source "web") from the submitted form."""
    form = await request.post()
    parsed = parse_form(_fields(entry), form)
    if parsed.errors:
        raise InputInvalid(parsed.errors)
    service = request.app[keys.PREDICTIONS]
    return await service.create(
        entry, entry.version_id, CreateRequest(input=parsed.input, source="web")
    )


# -- signing in and out ----------------------------------------------------------------------


async def login_form(request: web.Request) -> web.StreamResponse:
    next_path = _local_path(request.query.get("next"))
    if current_session(request, request.app[SESSIONS]) is not None:
        return redirect(next_path)
    ctx = page_context(request, signed_in=False)
    return html_response(templates.login_page(ctx, next_path=next_path))


async def login(request: web.Request) -> web.StreamResponse:
    if not from_this_site(request):
        return refused_cross_site(request)
    ctx = page_context(request, signed_in=False)
    form = await request.post()
    next_path = _local_path(form.get("next"))
    token = form.get("token")
    token = token.strip() if isinstance(token, str) else ""
    if not token or not request.app[keys.TOKENS].accepts(token):
        # The token itself is never logged.
        log.warning("playground sign-in refused for %s", request.remote)
        page_html = templates.login_page(
            ctx, next_path=next_path, error="That token is not one this server accepts."
        )
        return html_response(page_html, status=401)
    signer = request.app[SESSIONS]
    response = redirect(next_path)
    set_session_cookie(
        response, signer.issue(token), lifetime=signer.lifetime, secure=secure_cookies(request)
    )
    log.info("playground sign-in from %s", request.remote)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    if not from_this_site(request):
        return refused_cross_site(request)
    response = redirect("/login")
    clear_session_cookie(response, secure=secure_cookies(request))
    return response


# -- pages -----------------------------------------------------------------------------------


@page
async def models_page(request: web.Request) -> web.StreamResponse:
    store = request.app[keys.STORE]
    entries = [
        (entry, _state(request, entry), await store.count_for_model(entry.ref))
        for entry in request.app[keys.CATALOG]
    ]
    return html_response(templates.models_page(page_context(request, signed_in=True), entries))


def _modelhtml_response(request: web.Request, entry: ModelEntry, **kwargs: Any) -> Markup:
    state = _state(request, entry)
    notice = "" if state == "ready" else f"This model is {state}."
    return templates.model_page(
        page_context(request, signed_in=True), entry, _fields(entry), state=notice, **kwargs
    )


@page
async def model_page(request: web.Request) -> web.StreamResponse:
    entry = _entry(request)
    values = None
    source_id = request.query.get("from")
    if source_id:
        # "Run again with this input": the form starts from an earlier prediction's input.
        earlier = await _prediction(request, source_id)
        if earlier.model == entry.ref:
            values = form_values(_fields(entry), earlier.input)
    return html_response(_modelhtml_response(request, entry, values=values))


@page
async def submit_model_form(request: web.Request) -> web.StreamResponse:
    """The form posted without JavaScript: create, then go to the prediction's page."""
    entry = _entry(request)
    try:
        prediction = await _create(request, entry)
    except ApiError as exc:
        form = await request.post()
        values = {
            f.name: value for f in _fields(entry) if isinstance(value := form.get(f.name, ""), str)
        }
        errors = exc.errors if isinstance(exc, InputInvalid) else []
        problem = None if isinstance(exc, InputInvalid) else exc.detail
        body = _modelhtml_response(request, entry, values=values, errors=errors, problem=problem)
        return html_response(body, status=exc.status)
    return redirect(f"/predictions/{prediction.id}")


@page
async def prediction_page(request: web.Request) -> web.StreamResponse:
    prediction = await _prediction(request)
    ctx = page_context(request, signed_in=True)
    return html_response(templates.prediction_page(ctx, _panel(request, prediction), prediction))


@page
async def cancel_from_page(request: web.Request) -> web.StreamResponse:
    prediction = await _prediction(request)
    await request.app[keys.PREDICTIONS].cancel(prediction.id)
    return redirect(f"/predictions/{prediction.id}")


@page
async def history_page(request: web.Request) -> web.StreamResponse:
    try:
        found = await request.app[keys.STORE].page(
            limit=HISTORY_PAGE_SIZE, cursor=request.query.get("cursor") or None
        )
    except CursorInvalid:
        return redirect("/predictions")
    service = request.app[keys.PREDICTIONS]
    shown = []
    for stored in found.predictions:
        live = service.live(stored.id)
        shown.append(live.prediction if live else stored)
    ctx = page_context(request, signed_in=True)
    body = templates.history_page(ctx, shown, newer=found.previous_cursor, older=found.next_cursor)
    return html_response(body)


# -- the pages' JSON calls -------------------------------------------------------------------


@page_api
async def api_create(request: web.Request) -> web.StreamResponse:
    prediction = await _create(request, _entry(request))
    wire = prediction.to_wire(base_url(request))
    return json_response(wire, status=201, headers={"Location": f"/predictions/{prediction.id}"})


@page_api
async def api_get(request: web.Request) -> web.StreamResponse:
    prediction = await _prediction(request)
    return json_response(prediction.to_wire(base_url(request)))


@page_api
async def api_panel(request: web.Request) -> web.StreamResponse:
    """The prediction panel as HTML, for the page to swap in when the prediction changes."""
    prediction = await _prediction(request)
    return web.Response(text=_panel(request, prediction), content_type="text/html")


@page_api
async def api_cancel(request: web.Request) -> web.StreamResponse:
    prediction = await _prediction(request)
    canceled = await request.app[keys.PREDICTIONS].cancel(prediction.id)
    return json_response((canceled or prediction).to_wire(base_url(request)))


@page_api
async def api_upload(request: web.Request) -> web.StreamResponse:
    """Upload a file through the files API (`POST /v1/files`) on the person's behalf.

    The page's script sends the file here with its session cookie, since /v1/files takes a
    bearer token the page never has; the answer is the files API's own, and the file's
    `urls.get` goes into the input (the server reads it from disk when the job runs).
    """
    return await create_file(request)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", models_page, name="web-models")
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/models/{owner}/{name}", model_page)
    app.router.add_post("/models/{owner}/{name}", submit_model_form)
    app.router.add_get("/predictions", history_page)
    app.router.add_get("/predictions/{id}", prediction_page)
    app.router.add_post("/predictions/{id}/cancel", cancel_from_page)
    app.router.add_post("/web/api/models/{owner}/{name}/predictions", api_create)
    app.router.add_get("/web/api/predictions/{id}", api_get)
    app.router.add_get("/web/api/predictions/{id}/panel", api_panel)
    app.router.add_post("/web/api/predictions/{id}/cancel", api_cancel)
    app.router.add_post("/web/api/files", api_upload)
