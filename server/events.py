"""Per-prediction event logs: what stream readers replay and follow.

Every change a model reports (an output chunk, log text, the end) becomes a `StreamEvent`
appended to the prediction's `EventLog`. Readers iterate the log from any position and wait
for more without polling. Event ids are derived from the prediction's state after the event,
`{output items}-{log characters}`, so a finished prediction replayed from SQLite produces the
same ids as the live stream did and `Last-Event-ID` means the same thing in both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import attrs

from server.records import Prediction, Status

EventName = Literal["output", "logs", "error", "done"]


@attrs.frozen
class StreamEvent:
    event: EventName
    data: str
    id: str


def event_id(outputs: int, log_chars: int, *, done: bool = False) -> str:
    return f"{outputs}-{log_chars}{'-done' if done else ''}"


def parse_event_id(value: str) -> tuple[int, int, bool] | None:
    """The (outputs, log characters, done) a `Last-Event-ID` names; None if it is not ours."""
    parts = value.strip().split("-")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "done"):
        return None
    try:
        outputs, chars = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if outputs < 0 or chars < 0:
        return None
    return outputs, chars, len(parts) == 3


def done_events(prediction: Prediction) -> list[StreamEvent]:
    """The closing events of a finished prediction: `error` when it failed, then `done`."""
    outputs = len(prediction.output) if isinstance(prediction.output, list) else 0
    done_id = event_id(outputs, len(prediction.logs), done=True)
    match prediction.status:
        case Status.SUCCEEDED:
            return [StreamEvent("done", "{}", done_id)]
        case Status.CANCELED:
            return [StreamEvent("done", json.dumps({"reason": "canceled"}), done_id)]
        case _:
            detail = json.dumps({"detail": prediction.error or "prediction failed"})
            return [
                StreamEvent("error", detail, event_id(outputs, len(prediction.logs))),
                StreamEvent("done", json.dumps({"reason": "error"}), done_id),
            ]


def replay(prediction: Prediction) -> list[StreamEvent]:
    """The events of a prediction as stored: logs, each output item, and the end if finished."""
    events: list[StreamEvent] = []
    if prediction.logs:
        events.append(StreamEvent("logs", prediction.logs, event_id(0, len(prediction.logs))))
    items = prediction.output if isinstance(prediction.output, list) else []
    for i, item in enumerate(items):
        events.append(StreamEvent("output", _text(item), event_id(i + 1, len(prediction.logs))))
    if prediction.output is not None and not isinstance(prediction.output, list):
        events.append(
            StreamEvent("output", _text(prediction.output), event_id(1, len(prediction.logs)))
        )
    if prediction.status.terminal:
        events.extend(done_events(prediction))
    return events


def _text(item: Any) -> str:
    return item if isinstance(item, str) else json.dumps(item)


def resume_after(events: list[StreamEvent], last_event_id: str | None) -> list[StreamEvent]:
    """The events a reader that saw `last_event_id` has not seen yet."""
    if not last_event_id:
        return events
    seen = parse_event_id(last_event_id)
    if seen is None:
        return events
    outputs, chars, _ = seen
    rest = []
    for ev in events:
        ev_state = parse_event_id(ev.id)
        assert ev_state is not None
        ev_outputs, ev_chars, _ = ev_state
        if ev.event == "output" and ev_outputs <= outputs:
            continue
        if ev.event == "logs" and ev_chars <= chars:
            continue
        if ev.event == "error" and seen[2]:
            continue
        if ev.event == "done" and seen[2]:
            continue
        rest.append(ev)
    return rest


class EventLog:
    """The append-only event list of one prediction, with wake-ups for followers."""

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

    async def follow(self, start: int = 0) -> AsyncIterator[StreamEvent]:
        """Yield events from index `start`, waiting for new ones, until `done`."""
        index = start
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                yield event
                if event.event == "done":
                    return
            if self.closed:
                return
            await self._wakeup.wait()
