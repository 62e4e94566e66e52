"""Per-prediction event logs: what stream readers replay and follow, and their wire format.

Every change a model reports (an output chunk, log text, the end) becomes a `StreamEvent`
appended to the prediction's `EventLog`. Readers take the log from any position and wait
for more without polling; the log never waits for a reader, so a slow one cannot hold up the
model or the others.

An event's id is the prediction's state after it, `{outputs}-{log characters}`, with `-error`
or `-done` on the closing events. A finished prediction replayed from SQLite therefore gives
ids that mean the same as the live stream's did, and `Last-Event-ID` names a `Position` that
`resume_after` continues from, whichever of the two the reader gets.
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

import attrs

from server.records import Prediction, Status

EventName = Literal["output", "logs", "error", "done"]
_EVENT_ID = re.compile(r"(\d{1,18})-(\d{1,18})(?:-(error|done))?", re.ASCII)


class Stage(enum.IntEnum):
    """How far a prediction's events have come; each later stage includes the earlier."""

    RUNNING = 0
    ERROR = 1
    DONE = 2


@attrs.frozen
class Position:
    """What a reader has seen: so many output items, so many log characters, and the stage."""

    outputs: int
    log_chars: int
    stage: Stage = Stage.RUNNING

    @classmethod
    def parse(cls, value: str) -> Position | None:
        """The position an event id names; None if it is not one of ours."""
        match = _EVENT_ID.fullmatch(value.strip())
        if match is None:
            return None
        stage = {None: Stage.RUNNING, "error": Stage.ERROR, "done": Stage.DONE}[match[3]]
        return cls(int(match[1]), int(match[2]), stage)

    def __str__(self) -> str:
        suffix = {Stage.RUNNING: "", Stage.ERROR: "-error", Stage.DONE: "-done"}[self.stage]
        return f"{self.outputs}-{self.log_chars}{suffix}"


@attrs.frozen
class StreamEvent:
    event: EventName
    data: str
    id: str

    @property
    def position(self) -> Position:
        position = Position.parse(self.id)
        assert position is not None, f"event id {self.id!r} was not made by event_id()"
        return position


def event_id(outputs: int, log_chars: int, *, done: bool = False, error: bool = False) -> str:
    stage = Stage.DONE if done else Stage.ERROR if error else Stage.RUNNING
    return str(Position(outputs, log_chars, stage))


def parse_event_id(value: str) -> tuple[int, int, bool] | None:
    """The (outputs, log characters, done) a `Last-Event-ID` names; None if it is not ours."""
    position = Position.parse(value)
    if position is None:
        return None
    return position.outputs, position.log_chars, position.stage is Stage.DONE


def _outputs(prediction: Prediction) -> int:
    if isinstance(prediction.output, list):
        return len(prediction.output)
    return int(prediction.output is not None)


def done_events(prediction: Prediction) -> list[StreamEvent]:
    """The closing events of a finished prediction: `error` when it failed, then `done`."""
    outputs, chars = _outputs(prediction), len(prediction.logs)
    done_id = event_id(outputs, chars, done=True)
    match prediction.status:
        case Status.SUCCEEDED:
            return [StreamEvent("done", "{}", done_id)]
        case Status.CANCELED:
            return [StreamEvent("done", json.dumps({"reason": "canceled"}), done_id)]
        case _:
            detail = json.dumps({"detail": prediction.error or "prediction failed"})
            return [
                StreamEvent("error", detail, event_id(outputs, chars, error=True)),
                StreamEvent("done", json.dumps({"reason": "error"}), done_id),
            ]


def replay(prediction: Prediction) -> list[StreamEvent]:
    """The events of a prediction as stored: its logs, each output item, the end if finished."""
    events: list[StreamEvent] = []
    chars = len(prediction.logs)
    if prediction.logs:
        events.append(StreamEvent("logs", prediction.logs, event_id(0, chars)))
    items = prediction.output if isinstance(prediction.output, list) else []
    for i, item in enumerate(items):
        events.append(StreamEvent("output", output_text(item), event_id(i + 1, chars)))
    if prediction.output is not None and not isinstance(prediction.output, list):
        events.append(StreamEvent("output", output_text(prediction.output), event_id(1, chars)))
    if prediction.status.terminal:
        events.extend(done_events(prediction))
    return events


def output_text(item: Any) -> str:
    """The `data` of an output event: text as it is, anything else as JSON."""
    return item if isinstance(item, str) else json.dumps(item)


def resume_after(events: Iterable[StreamEvent], last_event_id: str | None) -> list[StreamEvent]:
    """The events a reader that saw `last_event_id` has not seen yet, nothing more or less.

    Works on the live log and on a stored replay alike: an output is new when it takes the
    count past the reader's, log text when it ends past the reader's characters (a replayed
    log event the reader saw part of is cut to the unseen rest), `error` and `done` when the
    reader's stage is before them. An id that is not ours resumes from the start.
    """
    seen = Position.parse(last_event_id) if last_event_id else None
    if seen is None:
        return list(events)
    rest: list[StreamEvent] = []
    for ev in events:
        at = ev.position
        match ev.event:
            case "output" if at.outputs > seen.outputs:
                rest.append(ev)
            case "logs" if at.log_chars > seen.log_chars:
                start = at.log_chars - len(ev.data)
                if start < seen.log_chars:
                    ev = StreamEvent("logs", ev.data[seen.log_chars - start :], ev.id)
                rest.append(ev)
            case "error" if seen.stage < Stage.ERROR:
                rest.append(ev)
            case "done" if seen.stage < Stage.DONE:
                rest.append(ev)
    return rest


# -- the wire format ---------------------------------------------------------------------

#: Where the SSE standard ends a line; a data line may contain none of these.
SSE_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
#: Where the official Python client ends a line: httpx's `iter_lines` splits like
#: `str.splitlines`, so form feeds, U+2028 and the like end a line there too. Text after one
#: of these inside a data line would be read as a new field: lost, or taken for an `event:`
#: line (which makes the client raise or stop early).
PYTHON_CLIENT_LINE_BREAKS = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def encode_event(event: StreamEvent, line_breaks: re.Pattern[str] = SSE_LINE_BREAKS) -> str:
    """One event as `text/event-stream`: `event:`, `id:`, one `data:` line per line of text.

    Readers join data lines with `\\n`, so text comes back as sent except that each line break
    (`\\r\\n`, a lone `\\r`, or for `PYTHON_CLIENT_LINE_BREAKS` any of its breaks) arrives as
    `\\n`: SSE has no escape for a carriage return inside a data line.
    """
    data = "".join(f"data: {line}\n" for line in line_breaks.split(event.data))
    return f"event: {event.event}\nid: {event.id}\n{data}\n"


class EventLog:
    """The append-only event list of one prediction, with wake-ups for readers."""

    def __init__(self) -> None:
        self.events: list[StreamEvent] = []
        self.closed = False
        self._wakeup = asyncio.Event()

    def append(self, event: StreamEvent) -> None:
        if self.closed:
            return
        self.events.append(event)
        if event.event == "done":
            self.closed = True
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    async def next_batch(self, start: int) -> list[StreamEvent]:
        """The events from index `start` on, waiting for one if there are none yet.

        Empty only when the log is closed and has nothing past `start`. A reader that fell
        behind gets everything it missed at once, so it can send it in one write.
        """
        while start >= len(self.events) and not self.closed:
            await self._wakeup.wait()
        return self.events[start:]

    async def follow(self, start: int = 0) -> AsyncIterator[StreamEvent]:
        """Yield events from index `start`, waiting for new ones, until `done`."""
        index = start
        while batch := await self.next_batch(index):
            index += len(batch)
            for event in batch:
                yield event
