"""Properties of the event wire format and of resuming, over arbitrary text (hypothesis).

SSE has no escape for line breaks inside a data line: the encoder splits text at each break
into `data:` lines and every reader joins them with `\\n`. So a chunk comes back exactly
unless it has a carriage return, and then with each `\\r\\n` or lone `\\r` as `\\n`, the most
any SSE server can do. For the official Python client, whose line splitting also breaks at
form feeds, U+2028 and the like, the encoder splits there too, so no text can cut a chunk
short or pass for an `event:` line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from replicate.client import Client as ReplicateClient
from replicate.stream import EventSource

from server.events import (
    PYTHON_CLIENT_LINE_BREAKS,
    SSE_LINE_BREAKS,
    StreamEvent,
    done_events,
    encode_event,
    event_id,
    replay,
    resume_after,
)
from server.records import Prediction, Status
from tests.test_streams_support import SSEParser

#: Text rich in what framing can get wrong: every line break either side knows, colons,
#: spaces, field names, NUL, and non-ASCII.
PIECES = (
    *("\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", ":", " "),
    *("event: done", "data: x", "id: 9", "\0", "é", "🚀"),
)
TRICKY = st.lists(
    st.one_of(st.sampled_from(PIECES), st.characters(codec="utf-8")), max_size=20
).map("".join)
ANY_TEXT = st.one_of(TRICKY, st.text())


def _split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """`data` in pieces, cut at the given offsets (network reads end anywhere)."""
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[start:cut]
        start = cut
    yield data[start:]


@given(text=ANY_TEXT, cuts=st.lists(st.integers(min_value=0), max_size=6))
@example(text="\r", cuts=[])
@example(text="\n", cuts=[])
@example(text="\r\n", cuts=[])
@example(text="a\r\nb\rc\nd", cuts=[3])
@example(text="", cuts=[])
@example(text=" leading space", cuts=[])
@example(text="\n\nevent: done\n\n", cuts=[])
def test_a_browser_parser_gets_the_chunk_back(text: str, cuts: list[int]) -> None:
    event = StreamEvent("output", text, event_id(3, 7))
    parser = SSEParser()
    got = []
    for piece in _split(encode_event(event).encode(), cuts):
        got += parser.feed(piece)
    assert len(got) == 1
    assert (got[0].event, got[0].id) == ("output", "3-7")
    assert got[0].data == SSE_LINE_BREAKS.sub("\n", text)
    if "\r" not in text:
        assert got[0].data == text


def _python_client_events(raw: bytes, cuts: list[int]) -> list[Any]:
    response = httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=iter(list(_split(raw, cuts))),
    )
    return list(EventSource(ReplicateClient(api_token="unused"), response))


@given(text=ANY_TEXT, cuts=st.lists(st.integers(min_value=0), max_size=6))
@example(text="a\u2028event: done", cuts=[])
@example(text="x\x0cevent: start", cuts=[])
@example(text="\r\n", cuts=[1])
def test_the_python_client_gets_the_chunk_back(text: str, cuts: list[int]) -> None:
    raw = (
        b": ping\n\n"
        + "".join(
            encode_event(e, PYTHON_CLIENT_LINE_BREAKS)
            for e in (StreamEvent("output", text, "1-0"), StreamEvent("done", "{}", "1-0-done"))
        ).encode()
    )
    events = _python_client_events(raw, cuts)
    assert [e.event.value for e in events] == ["output", "done"]
    # transform_output turns https:/data: strings into FileOutput; compare the raw text.
    data = str(getattr(events[0].data, "url", events[0].data))
    assert data == PYTHON_CLIENT_LINE_BREAKS.sub("\n", text)


def test_the_python_client_needs_its_own_line_breaks() -> None:
    """With standard framing, U+2028 would let output text end the stream early."""
    raw = encode_event(StreamEvent("output", "a\u2028event: done", "1-0")).encode()
    events = _python_client_events(raw + b"event: output\nid: 2-0\ndata: b\n\n", [])
    assert [e.event.value for e in events] == ["done"]  # the text took over the event name


# -- resuming -----------------------------------------------------------------------------

STEPS = st.lists(st.tuples(st.sampled_from(["output", "logs"]), st.text(max_size=5)), max_size=12)
ENDS = st.sampled_from([Status.SUCCEEDED, Status.FAILED, Status.CANCELED])


def _live(steps: list[tuple[str, str]], end: Status) -> tuple[list[StreamEvent], Prediction]:
    """The events `server.predictions` appends for these steps, and the stored prediction."""
    p = Prediction(id="p", model="o/n", version="v", input={}, output=[])
    events = []
    p.transition(Status.PROCESSING)
    for kind, text in steps:
        if kind == "output":
            p.output.append(text)
        elif text:  # empty log text is dropped
            p.logs += text
        else:
            continue
        events.append(StreamEvent(kind, text, event_id(len(p.output), len(p.logs))))  # type: ignore[arg-type]
    if end is Status.FAILED:
        p.error = "broken"
        p.logs += "Prediction failed: broken\n"
        events.append(
            StreamEvent("logs", "Prediction failed: broken\n", event_id(len(p.output), len(p.logs)))
        )
    p.transition(end)
    events += done_events(p)
    return events, p


def _assembled(events: list[StreamEvent]) -> tuple[str, str, list[tuple[str, str]]]:
    out = "".join(e.data for e in events if e.event == "output")
    logs = "".join(e.data for e in events if e.event == "logs")
    return out, logs, [(e.event, e.data) for e in events if e.event in ("error", "done")]


@given(steps=STEPS, end=ENDS)
def test_resuming_after_any_event_gets_exactly_the_rest(
    steps: list[tuple[str, str]], end: Status
) -> None:
    events, stored = _live(steps, end)
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)  # an id names one event
    assert resume_after(events, None) == events
    assert resume_after(events, "not-an-id") == events
    stored_events = replay(stored)
    assert _assembled(stored_events) == _assembled(events)
    for k, seen in enumerate(events):
        # The live log: exactly the events after it.
        assert resume_after(events, seen.id) == events[k + 1 :]
        # A stored replay has other shapes (all logs in one event), same content after it.
        rest = resume_after(stored_events, seen.id)
        before = _assembled(events[: k + 1])
        after = _assembled(rest)
        joined = (before[0] + after[0], before[1] + after[1], before[2] + after[2])
        assert joined == _assembled(events)


def test_event_ids_parse_strictly() -> None:
    from server.events import Position, Stage

    assert Position.parse("3-7") == Position(3, 7)
    assert Position.parse("3-7-done") == Position(3, 7, Stage.DONE)
    assert Position.parse(" 0-0-error ") == Position(0, 0, Stage.ERROR)
    for bad in ("", "3", "3-", "-1-2", "3-7-later", "²-1", "1:2", "1-2-done-x"):
        assert Position.parse(bad) is None, bad


@pytest.mark.parametrize("status", [Status.SUCCEEDED, Status.CANCELED, Status.FAILED])
def test_done_data(status: Status) -> None:
    p = Prediction(id="p", model="o/n", version="v", input={}, output=["a"])
    p.transition(Status.PROCESSING)
    p.error = "bad" if status is Status.FAILED else None
    p.transition(status)
    done = done_events(p)[-1]
    assert done.event == "done"
    expected = {Status.SUCCEEDED: {}, Status.CANCELED: {"reason": "canceled"}}
    assert json.loads(done.data) == expected.get(status, {"reason": "error"})
