"""Server-sent event streams: `GET /v1/streams/{token}` and `POST /v1/run_sse`.

The stream URL carries an unguessable capability token bound to one prediction, so a browser
`EventSource` can open it with no headers (a bearer header is accepted, not needed). Events
follow Replicate's wire format (`server.events`): `output`, `logs`, `error` and `done`, each
with an `id:`, and `: ping` comments keep idle streams alive. A reader gets everything so far,
then follows live; `Last-Event-ID` resumes after that event; once a reader has seen `done`, a
reconnect gets 204, which tells a browser to stop. A URL answers 410 once `stream_ttl` has
passed since its prediction ended.

Readers share the prediction's `EventLog`, each at its own index, and write what they have
not sent yet in one go; the log never waits for them. A reader whose write has waited
`stream_send_timeout` is dropped (aiohttp-sse aborts the connection; the kernel does too,
through TCP_USER_TIMEOUT), and a client that disconnects is noticed at once
(`_DisconnectWatch`), so its task and buffers are freed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import attrs
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from server import keys
from server.auth import bearer_token
from server.errors import ApiError, NotFound, TooManyStreams
from server.events import (
    PYTHON_CLIENT_LINE_BREAKS,
    SSE_LINE_BREAKS,
    EventLog,
    Position,
    Stage,
    StreamEvent,
    encode_event,
    replay,
    resume_after,
)
from server.http import read_json_object
from server.records import utcnow
from server.routes.predictions import parse_create_request, resolve_model

_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,100}")
#: Most events written at once: a reader far behind catches up in writes of bounded size.
MAX_EVENTS_PER_WRITE = 256


class StreamExpired(ApiError):
    status = 410
    title = "Stream expired"


class EventStream(EventSourceResponse):
    """An aiohttp-sse response that writes `StreamEvent`s, all that are waiting at once."""

    def __init__(
        self,
        *,
        line_breaks: re.Pattern[str],
        send_timeout: float,
        ping_interval: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            headers=headers,
            sep="\n",
            send_timeout=send_timeout,
            ping_interval=ping_interval,
            allow_all_methods=True,  # POST /v1/run_sse answers with a stream too
        )
        self._line_breaks = line_breaks
        self._write_timeout = send_timeout

    async def send_events(self, events: Sequence[StreamEvent]) -> None:
        """Write `events`; TimeoutError (and the connection aborted) if the reader is stuck."""
        for start in range(0, len(events), MAX_EVENTS_PER_WRITE):
            batch = events[start : start + MAX_EVENTS_PER_WRITE]
            text = "".join(encode_event(event, self._line_breaks) for event in batch)
            try:
                async with asyncio.timeout(self._write_timeout):
                    # Lone surrogates cannot be UTF-8; a model's text has none, but never crash.
                    await self.write(text.encode("utf-8", "replace"))
            except TimeoutError:
                # As aiohttp-sse's own send(): a stalled peer never drains, so abort.
                self.stop_streaming()
                self._abort_transport()
                raise


@attrs.define(eq=False)
class Reader:
    """One open stream: the task serving it, and why it was stopped, if it was."""

    task: asyncio.Task[Any]
    stopped: str | None = None

    def stop(self, why: str) -> None:
        if self.stopped is None and not self.task.done():
            self.stopped = why
            self.task.cancel()


class StreamHub:
    """The open streams: how many there are, and a way to end them all at shutdown."""

    def __init__(self, *, per_token: int) -> None:
        self._readers: set[Reader] = set()
        #: Open streams per credential (see `reading`).
        self._per_token: collections.Counter[str] = collections.Counter()
        self._limit = per_token
        self._empty = asyncio.Event()
        self._empty.set()
        self.closing = False

    def __len__(self) -> int:
        return len(self._readers)

    async def wait_empty(self) -> None:
        """Until no stream is open (every reader has finished or been dropped)."""
        await self._empty.wait()

    def check(self, credential: str) -> None:
        """TooManyStreams (429) if `credential` may open no more streams now."""
        if self._per_token[credential] >= self._limit:
            raise TooManyStreams(
                f"{self._limit} streams are already open with this token; close one first.",
                headers={"Retry-After": "1"},
            )

    @contextlib.contextmanager
    def reading(self, request: web.Request, credential: str) -> Iterator[Reader]:
        """Count a reader in; TooManyStreams if `credential` has the most streams open.

        `credential` is what opened the stream: the stream URL's token or an API token.
        """
        self.check(credential)
        task = asyncio.current_task()
        assert task is not None
        reader = Reader(task)
        watch = _DisconnectWatch.install(request, reader)
        self._readers.add(reader)
        self._per_token[credential] += 1
        self._empty.clear()
        try:
            yield reader
        finally:
            self._per_token[credential] -= 1
            if self._per_token[credential] <= 0:
                del self._per_token[credential]
            self._readers.discard(reader)
            if not self._readers:
                self._empty.set()
            if watch is not None:
                watch.remove()

    async def close(self, _: web.Application) -> None:
        """`on_shutdown`: end every stream now rather than hold shutdown for its timeout."""
        self.closing = True
        for reader in list(self._readers):
            reader.stop("the server is shutting down")


STREAM_HUB = web.AppKey("stream_hub", StreamHub)


class _DisconnectWatch(asyncio.Protocol):
    """Stands between a stream's transport and aiohttp's protocol; stops the reader on close.

    aiohttp cancels the handler of a client that went away only when the whole server runs
    with `handler_cancellation=True`, which would also cut creates in half. Without this an
    idle stream would notice only at its next write, up to a ping interval later. Every
    callback goes on to aiohttp's protocol unchanged, and `remove` restores it.
    """

    def __init__(self, transport: asyncio.Transport, inner: asyncio.Protocol, reader: Reader):
        self._transport = transport
        self._inner = inner
        self._reader = reader

    @classmethod
    def install(cls, request: web.Request, reader: Reader) -> _DisconnectWatch | None:
        transport = request.transport
        if not isinstance(transport, asyncio.Transport) or transport.is_closing():
            return None  # gone already: the first write fails and ends the stream
        inner = transport.get_protocol()
        if not isinstance(inner, asyncio.Protocol) or isinstance(inner, asyncio.BufferedProtocol):
            return None
        watch = cls(transport, inner, reader)
        transport.set_protocol(watch)
        return watch

    def remove(self) -> None:
        if self._transport.get_protocol() is self:
            self._transport.set_protocol(self._inner)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._reader.stop("the client disconnected")


async def _send_stream(
    request: web.Request,
    backlog: Sequence[StreamEvent],
    log: EventLog | None,
    start: int,
    *,
    credential: str,
    headers: Mapping[str, str] | None = None,
) -> tuple[web.StreamResponse, bool]:
    """Answer with `backlog`, then `log`'s events from index `start` until `done`.

    Returns the response and whether the reader got `done` (False: it went away first, was
    dropped, or the server is shutting down).
    """
    config = request.app[keys.CONFIG]
    python_client = request.headers.get("User-Agent", "").startswith("replicate-python/")
    response = EventStream(
        line_breaks=PYTHON_CLIENT_LINE_BREAKS if python_client else SSE_LINE_BREAKS,
        send_timeout=config.stream_send_timeout,
        ping_interval=config.stream_ping_interval,
        headers=headers,
    )
    finished = False
    with request.app[STREAM_HUB].reading(request, credential) as reader:
        try:
            await response.prepare(request)
            async with response:  # stops the keep-alive pings however this ends
                if backlog:
                    await response.send_events(backlog)
                    finished = backlog[-1].event == "done"
                index = start
                while log is not None and not finished:
                    batch = await log.next_batch(index)
                    if not batch:
                        break
                    index += len(batch)
                    await response.send_events(batch)
                    finished = batch[-1].event == "done"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if reader.stopped is None or (task is not None and task.uncancel() > 0):
                raise
            # Stopped by us (disconnect or shutdown): end quietly, the slot is freed.
        except (ConnectionResetError, TimeoutError):
            pass  # the client went away, or stopped reading and was dropped
    return response, finished


async def get_stream(request: web.Request) -> web.StreamResponse:
    token = request.match_info["token"]
    found = None
    if _TOKEN.fullmatch(token):
        found = await request.app[keys.STORE].get_by_stream_token(token)
    if found is None:
        raise NotFound("This stream does not exist.")
    service = request.app[keys.PREDICTIONS]
    # The live prediction if it runs (no await then, so the log below matches it), else the
    # stored one, which is finished: it is saved before it leaves the live set.
    prediction = await service.get(found.id) or found
    log = service.event_log(prediction.id)
    ttl = request.app[keys.CONFIG].stream_ttl
    ended = prediction.completed_at
    if ended is not None and utcnow() - ended > timedelta(seconds=ttl):
        raise StreamExpired(
            f"This stream ended with its prediction more than {ttl:g} seconds ago; "
            f"fetch the prediction for its output."
        )
    last_event_id = request.headers.get("Last-Event-ID")
    seen = Position.parse(last_event_id) if last_event_id else None
    if seen is not None and seen.stage is Stage.DONE:
        # The reader has everything. 204 is what makes a browser's EventSource stop
        # reconnecting instead of replaying the stream in a loop.
        return web.Response(status=204)
    if log is None:
        events = replay(prediction)
        response, _ = await _send_stream(
            request, resume_after(events, last_event_id), None, 0, credential=token
        )
        return response
    snapshot = list(log.events)
    backlog = resume_after(snapshot, last_event_id)
    response, _ = await _send_stream(request, backlog, log, len(snapshot), credential=token)
    return response


async def run_sse(request: web.Request) -> web.StreamResponse:
    """Create a prediction and answer with its event stream (`event: done` ends it)."""
    body = await read_json_object(request)
    entry, version = resolve_model(request, body.get("model", body.get("version")), "model")
    credential = f"api:{bearer_token(request)}"
    request.app[STREAM_HUB].check(credential)  # before anything is created
    service = request.app[keys.PREDICTIONS]
    prediction = await service.create(entry, version, parse_create_request(body, request))
    log = service.event_log(prediction.id)
    backlog = [] if log is not None else replay(await service.get(prediction.id) or prediction)
    response, finished = await _send_stream(
        request,
        backlog,
        log,
        0,
        credential=credential,
        headers={"X-Prediction-Id": prediction.id},
    )
    config = request.app[keys.CONFIG]
    if not finished and config.run_sse_cancel_on_disconnect and not request.app[STREAM_HUB].closing:
        await service.cancel(prediction.id, reason="The /v1/run_sse client disconnected.")
    return response


def setup_routes(app: web.Application) -> None:
    hub = StreamHub(per_token=app[keys.CONFIG].max_streams_per_token)
    app[STREAM_HUB] = hub
    app.on_shutdown.append(hub.close)
    app.router.add_get("/v1/streams/{token}", get_stream, allow_head=False)
    app.router.add_post("/v1/run_sse", run_sse)
