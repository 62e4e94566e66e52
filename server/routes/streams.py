"""Server-sent event streams: `GET /v1/streams/{token}` and `POST /v1/run_sse`.

The stream URL carries an unguessable capability token bound to one prediction, so a browser
`EventSource` can open it with no headers. Events follow Replicate's wire format: `output`,
`logs`, `error` and `done`, each with an `id:`; nothing else (the official Python client
raises on unknown event names and yields nothing without ids).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from server import keys
from server.errors import NotFound
from server.events import EventLog, StreamEvent, parse_event_id, replay, resume_after
from server.http import read_json_object
from server.records import Prediction
from server.routes.predictions import _create_request, _resolve

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
STREAM_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


async def _send_all(response: EventSourceResponse, events: Iterable[StreamEvent]) -> None:
    for event in events:
        await response.send(event.data, id=event.id, event=event.event)


async def _stream(
    request: web.Request, prediction: Prediction, last_event_id: str | None
) -> web.StreamResponse:
    service = request.app[keys.PREDICTIONS]
    log: EventLog | None = service.event_log(prediction.id)
    if log is None:
        # Finished long ago: replay from the stored state.
        if prediction.status.terminal and last_event_id:
            seen = parse_event_id(last_event_id)
            if seen is not None and seen[2]:
                return web.Response(status=204, headers=STREAM_HEADERS)
        async with sse_response(request, headers=STREAM_HEADERS) as response:
            await _send_all(response, resume_after(replay(prediction), last_event_id))
        return response
    if log.closed and last_event_id:
        seen = parse_event_id(last_event_id)
        if seen is not None and seen[2]:
            return web.Response(status=204, headers=STREAM_HEADERS)
    async with sse_response(request, headers=STREAM_HEADERS) as response:
        backlog = list(log.events)
        await _send_all(response, resume_after(backlog, last_event_id))
        async for event in log.follow(len(backlog)):
            await response.send(event.data, id=event.id, event=event.event)
    return response


async def get_stream(request: web.Request) -> web.StreamResponse:
    token = request.match_info["token"]
    prediction = None
    if _TOKEN.match(token):
        prediction = await request.app[keys.STORE].get_by_stream_token(token)
    if prediction is None:
        raise NotFound("This stream does not exist or has expired.")
    live = await request.app[keys.PREDICTIONS].get(prediction.id)
    return await _stream(request, live or prediction, request.headers.get("Last-Event-ID"))


async def run_sse(request: web.Request) -> web.StreamResponse:
    """Create a prediction and answer with its event stream."""
    body = await read_json_object(request)
    entry, version = _resolve(request, body.get("model", body.get("version")), "model")
    prediction = await request.app[keys.PREDICTIONS].create(entry, version, _create_request(body))
    return await _stream(request, prediction, None)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/streams/{token}", get_stream)
    app.router.add_post("/v1/run_sse", run_sse)
