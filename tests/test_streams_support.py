"""Helpers of the streaming tests (no tests here): a scripted model, an SSE parser, a server.

`ScriptedBackend` sits behind the same `Backend` interface as the real text generator, and
emits what a test scripted, when the test says so: the one way to hold a prediction between
two chunks while readers connect, drop and resume. The tests that need a real model use the
tiny one.

`SSEParser` is the event-stream parser of the WHATWG HTML standard (what a browser's
`EventSource` runs), written from the spec rather than from our encoder.
"""

from __future__ import annotations

import asyncio
import codecs
import re
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from models.base import Backend, Job, LoadInfo, Outcome


@attrs.define(eq=False)
class Script:
    """What the scripted model does for one prompt.

    It emits `chunks` in order, `logs[i]` (if any) just before chunk i, then fails with
    `error` if set. Only the first `allowed` chunks go out at once (all when None); the test
    lets more go with `release`.
    """

    chunks: list[str]
    allowed: int | None = None
    logs: Mapping[int, str] = attrs.field(factory=dict)
    error: str | None = None
    _cond: threading.Condition = attrs.field(factory=threading.Condition, init=False)

    def release(self, upto: int | None = None) -> None:
        """Let chunks up to index `upto` (all when None) go out."""
        with self._cond:
            self.allowed = upto
            self._cond.notify_all()

    def wait_released(self, index: int, cancel: threading.Event) -> bool:
        """On the model thread: until chunk `index` may go; False if the job was canceled."""
        with self._cond:
            while not cancel.is_set() and self.allowed is not None and index >= self.allowed:
                # The job's cancel_event cannot notify this condition, so look every 20 ms.
                self._cond.wait(0.02)
        return not cancel.is_set()


class Scripts(dict[str, Script]):
    """Scripts by prompt. A prompt without one is emitted as its `|`-separated parts."""

    def for_prompt(self, prompt: str) -> Script:
        return self.get(prompt) or Script(prompt.split("|"))

    def release_all(self) -> None:
        for script in self.values():
            script.release()


class ScriptedBackend(Backend):
    """A model that runs `Script`s (one job at a time)."""

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts

    def load(self) -> LoadInfo:
        return LoadInfo(device="cpu", detail="scripted test model")

    def run_batch(self, jobs: Sequence[Job], yield_event: threading.Event) -> Sequence[Outcome]:
        return [self._run(job) for job in jobs]

    def _run(self, job: Job) -> Outcome:
        script = self.scripts.for_prompt(str(job.input["prompt"]))
        for index, chunk in enumerate(script.chunks):
            if not script.wait_released(index, job.cancel_event):
                return None
            if index in script.logs:
                job.sink.log(script.logs[index])
            job.sink.output(chunk)
        return RuntimeError(script.error) if script.error else None


def scripted_factory(scripts: Scripts) -> Callable[[Any], Callable[[], Backend]]:
    """A stand-in for `server.app.backend_factory` that gives every model a ScriptedBackend."""

    def factory(entry: Any) -> Callable[[], Backend]:
        return lambda: ScriptedBackend(scripts)

    return factory


# -- reading streams ----------------------------------------------------------------------


@attrs.frozen
class Event:
    event: str
    data: str
    id: str


_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEParser:
    """The WHATWG `text/event-stream` parser: feed it bytes, get the events dispatched."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._type = ""
        self._data: list[str] = []
        self.last_event_id = ""
        self.comments = 0

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += self._decoder.decode(chunk)
        events: list[Event] = []
        while (m := _LINE_END.search(self._buffer)) is not None:
            if m.group() == "\r" and m.end() == len(self._buffer):
                break  # maybe the first half of a CRLF
            line, self._buffer = self._buffer[: m.start()], self._buffer[m.end() :]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._type = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self.last_event_id = value
        return None

    def _dispatch(self) -> Event | None:
        data, kind = self._data, self._type
        self._data, self._type = [], ""
        if not data:
            return None
        return Event(kind or "message", "\n".join(data), self.last_event_id)


async def read_events(
    response: aiohttp.ClientResponse, parser: SSEParser | None = None
) -> AsyncIterator[Event]:
    """The events of a stream response as they arrive, until `done` or the stream ends."""
    parser = parser or SSEParser()
    async for chunk in response.content.iter_any():
        for event in parser.feed(chunk):
            yield event
            if event.event == "done":
                return


async def collect(response: aiohttp.ClientResponse, *, limit: int | None = None) -> list[Event]:
    """Every event until `done` (or the first `limit` events)."""
    events: list[Event] = []
    async for event in read_events(response):
        events.append(event)
        if limit is not None and len(events) >= limit:
            break
    return events


def output_text(events: Sequence[Event]) -> str:
    return "".join(e.data for e in events if e.event == "output")


# -- a server run as `replicant serve` runs it --------------------------------------------


@attrs.define
class LiveServer:
    """The real app on a loopback port, without aiohttp's test-only handler cancellation."""

    app: web.Application
    runner: web.AppRunner
    url: str = ""
    #: Answers to stream and run_sse requests, each as it is about to start (headers set).
    stream_requests: asyncio.Queue[tuple[web.Request, web.StreamResponse]] = attrs.field(
        factory=asyncio.Queue
    )
    #: Every request's method and path, in order of their answers.
    seen: list[tuple[str, str, int]] = attrs.field(factory=list)

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def record(self, request: web.Request, response: web.StreamResponse) -> None:
        """`on_response_prepare` hook (installed by the fixture)."""
        self.seen.append((request.method, request.path, response.status))
        if request.path.startswith(("/v1/streams/", "/v1/run_sse")):
            self.stream_requests.put_nowait((request, response))
