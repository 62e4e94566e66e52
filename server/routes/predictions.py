"""/v1/predictions, /v1/models/{owner}/{name}/predictions and /v1/run."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from models.catalog import ModelEntry
from server import keys
from server.errors import MalformedRequest, NotFound, RequestInvalid
from server.http import base_url, json_response, read_json_object
from server.predictions import CreateRequest
from server.records import WEBHOOK_EVENTS, Prediction, Status, parse_time
from server.store import CursorInvalid

_PREFER_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d+))?\s*$", re.IGNORECASE)
_ID = re.compile(r"^[a-z0-9]{1,64}$")
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?$")
MIN_CANCEL_AFTER = 5.0


def cancel_after(request: web.Request) -> float | None:
    """Seconds from `Cancel-After: 30s | 5m | 1h30m | 45`; at least 5, as Replicate's."""
    raw = request.headers.get("Cancel-After")
    if raw is None:
        return None
    match = _DURATION.match(raw.strip().lower())
    if not raw.strip() or match is None or not any(match.groups()):
        raise MalformedRequest(
            f"Cancel-After must be a duration like 30s, 5m or 1h30m, not {raw!r}."
        )
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total < MIN_CANCEL_AFTER:
        raise RequestInvalid(f"Cancel-After must be at least {MIN_CANCEL_AFTER:g} seconds.")
    return total


def prefer_wait(request: web.Request) -> int | None:
    """Seconds asked for by `Prefer: wait` / `Prefer: wait=N` (clamped), or None."""
    max_wait = request.app[keys.CONFIG].max_wait_seconds
    for header in request.headers.getall("Prefer", []):
        for preference in header.split(","):
            match = _PREFER_WAIT.match(preference.split(";")[0])
            if match is None:
                continue
            seconds = int(match.group(1)) if match.group(1) else max_wait
            if seconds < 1:
                return None
            return min(seconds, max_wait)
    return None


def parse_create_request(body: dict[str, Any], request: web.Request) -> CreateRequest:
    webhook = body.get("webhook")
    events = body.get("webhook_events_filter")
    legacy = body.get("webhook_completed")
    if webhook is None and legacy is not None:
        # The old field meant: call this URL when the prediction completes.
        webhook, events = legacy, events if events is not None else ["completed"]
    if webhook is not None:
        _check_webhook_url(webhook)
    parsed_events: tuple[str, ...] | None = None
    if events is not None:
        if isinstance(events, str):
            events = [e.strip() for e in events.split(",") if e.strip()]
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise RequestInvalid("webhook_events_filter must be a list of event names.")
        unknown = sorted(set(events) - set(WEBHOOK_EVENTS))
        if unknown:
            raise RequestInvalid(
                f"webhook_events_filter has unknown events {', '.join(unknown)}; "
                f"use any of {', '.join(WEBHOOK_EVENTS)}."
            )
        parsed_events = tuple(e for e in WEBHOOK_EVENTS if e in events)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestInvalid("stream must be true or false.")
    return CreateRequest(
        input=body.get("input", {}),
        webhook=webhook,
        webhook_events_filter=parsed_events,
        cancel_after=cancel_after(request),
    )


def _check_webhook_url(url: Any) -> None:
    if not isinstance(url, str) or len(url) > 65536:
        raise RequestInvalid("webhook must be an http(s) URL of at most 65536 characters.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise RequestInvalid(f"webhook is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestInvalid("webhook must be an absolute http or https URL.")


def resolve_model(request: web.Request, ref: Any, field: str) -> tuple[ModelEntry, str]:
    if not isinstance(ref, str) or not ref.strip():
        raise RequestInvalid(
            f"{field} is required: a version id, owner/name or owner/name:version id."
        )
    found = request.app[keys.CATALOG].resolve(ref)
    if found is None:
        raise NotFound(f"The model or version {ref!r} does not exist on this server.")
    return found


async def _create(
    request: web.Request, entry: ModelEntry, version: str, body: dict[str, Any]
) -> web.Response:
    service = request.app[keys.PREDICTIONS]
    prediction = await service.create(entry, version, parse_create_request(body, request))
    headers: dict[str, str] = {}
    wait = prefer_wait(request)
    if wait is not None:
        prediction = await service.wait(prediction.id, wait)
        headers["Preference-Applied"] = f"wait={wait}"
    return _created(request, prediction, headers, report_starting=wait is not None)


def _created(
    request: web.Request,
    prediction: Prediction,
    headers: dict[str, str],
    *,
    report_starting: bool,
) -> web.Response:
    wire = prediction.to_wire(base_url(request))
    if report_starting and not prediction.status.terminal:
        # The official clients take any other status as finished and return partial output
        # (replicate-python #385), so an unfinished wait answers `starting`, as documented.
        wire["status"] = str(Status.STARTING)
    headers["Location"] = wire["urls"]["get"]
    return json_response(wire, status=201, headers=headers)


async def create_prediction(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    entry, version = resolve_model(request, body.get("version"), "version")
    return await _create(request, entry, version, body)


async def create_model_prediction(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    owner, name = request.match_info["owner"], request.match_info["name"]
    entry = request.app[keys.CATALOG].get(owner, name)
    if entry is None:
        raise NotFound(f"The model {owner}/{name} does not exist on this server.")
    return await _create(request, entry, entry.version_id, body)


async def run(request: web.Request) -> web.Response:
    """Create a prediction and answer when it has finished."""
    body = await read_json_object(request)
    entry, version = resolve_model(request, body.get("model", body.get("version")), "model")
    service = request.app[keys.PREDICTIONS]
    prediction = await service.create(entry, version, parse_create_request(body, request))
    live = service.live(prediction.id)
    if live is not None:
        await live.done.wait()
    return _created(request, await service.wait(prediction.id, 0), {}, report_starting=False)


def _prediction_id(request: web.Request) -> str:
    prediction_id = request.match_info["id"]
    if not _ID.match(prediction_id):
        raise NotFound(f"Prediction {prediction_id!r} was not found.")
    return prediction_id


async def get_prediction(request: web.Request) -> web.Response:
    prediction_id = _prediction_id(request)
    prediction = await request.app[keys.PREDICTIONS].get(prediction_id)
    if prediction is None:
        raise NotFound(f"Prediction {prediction_id} was not found.")
    return json_response(prediction.to_wire(base_url(request)))


async def cancel_prediction(request: web.Request) -> web.Response:
    prediction_id = _prediction_id(request)
    prediction = await request.app[keys.PREDICTIONS].cancel(prediction_id)
    if prediction is None:
        raise NotFound(f"Prediction {prediction_id} was not found.")
    return json_response(prediction.to_wire(base_url(request)))


async def list_predictions(request: web.Request) -> web.Response:
    query = request.query
    times = {}
    for field in ("created_after", "created_before"):
        if field in query:
            try:
                times[field] = parse_time(query[field])
            except ValueError as exc:
                raise MalformedRequest(f"{field} must be an ISO-8601 time: {exc}") from exc
    config = request.app[keys.CONFIG]
    try:
        page = await request.app[keys.STORE].page(
            limit=config.page_size,
            cursor=query.get("cursor"),
            created_after=times.get("created_after"),
            created_before=times.get("created_before"),
        )
    except CursorInvalid as exc:
        raise MalformedRequest("The cursor is not one this server made.") from exc
    service = request.app[keys.PREDICTIONS]
    base = base_url(request)
    results = []
    for stored in page.predictions:
        live = service.live(stored.id)
        results.append((live.prediction if live else stored).to_wire(base))

    def link(cursor: str | None) -> str | None:
        if cursor is None:
            return None
        params = {k: v for k, v in query.items() if k != "cursor"}
        params["cursor"] = cursor
        return f"{base}/v1/predictions?{urlencode(params)}"

    return json_response(
        {
            "next": link(page.next_cursor),
            "previous": link(page.previous_cursor),
            "results": results,
        }
    )


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/predictions", create_prediction)
    app.router.add_get("/v1/predictions", list_predictions)
    app.router.add_get("/v1/predictions/{id}", get_prediction)
    app.router.add_post("/v1/predictions/{id}/cancel", cancel_prediction)
    app.router.add_post("/v1/models/{owner}/{name}/predictions", create_model_prediction)
    app.router.add_post("/v1/run", run)
