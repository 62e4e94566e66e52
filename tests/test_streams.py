"""Stream URLs and `POST /v1/run_sse` against the real app, run as `replicant serve` runs it.

The scripted model (tests/test_streams_support.py) holds a prediction between chunks, so
readers can connect late, drop and resume at exact points; the official clients and the
tiny real model are in test_streams_python_client.py and test_js_client.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from server import keys
from server.events import SSE_LINE_BREAKS
from server.records import Status
from server.routes.streams import STREAM_HUB
from tests.conftest import AUTH, LiveStarter
from tests.test_streams_support import (
    Event,
    LiveServer,
    Script,
    Scripts,
    collect,
    output_text,
    read_events,
)

SMOL = "huggingfacetb/smollm2-135m-instruct"
EVENT_NAMES = {"output", "logs", "error", "done"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


async def create(
    http: aiohttp.ClientSession, server: LiveServer, prompt: str, **body: Any
) -> dict[str, Any]:
    async with http.post(
        f"{server.url}/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": prompt}, **body},
        headers=AUTH,
    ) as resp:
        assert resp.status == 201, await resp.text()
        created: dict[str, Any] = await resp.json()
        return created


async def finished(server: LiveServer, prediction_id: str) -> dict[str, Any]:
    """The prediction's wire object once it has ended (bounded at 30 s)."""
    prediction = await server.app[keys.PREDICTIONS].wait(prediction_id, 30)
    assert prediction.status.terminal, prediction.status
    return prediction.to_wire(server.url)


async def stream_events(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> list[Event]:
    async with asyncio.timeout(30), http.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        return await collect(resp)


# -- the stream URL -----------------------------------------------------------------------


async def test_every_iterator_prediction_has_a_stream_url(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    tokens = set()
    for body in ({}, {"stream": True}, {"stream": False}):
        created = await create(http, server, "a|b", **body)
        url = created["urls"]["stream"]
        assert url.startswith(f"{server.url}/v1/streams/")
        assert "/v1/files/" not in url  # the JS client would take every output for a file URL
        token = url.rsplit("/", 1)[1]
        assert len(token) >= 40
        tokens.add(token)
        assert output_text(await stream_events(http, url)) == "ab"
    assert len(tokens) == 3
    # A synchronous create has it too.
    async with http.post(
        f"{server.url}/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": "x"}},
        headers={**AUTH, "Prefer": "wait"},
    ) as resp:
        assert (await resp.json())["urls"]["stream"].startswith(f"{server.url}/v1/streams/")


async def test_unknown_stream_is_404_and_a_bearer_header_is_optional(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    async with http.get(f"{server.url}/v1/streams/{'x' * 43}") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/problem+json"
        assert (await resp.json())["detail"] == "This stream does not exist."
    url = (await create(http, server, "a|b|c"))["urls"]["stream"]
    assert output_text(await stream_events(http, url, headers=AUTH)) == "abc"
    assert output_text(await stream_events(http, url)) == "abc"


async def test_wire_format(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    chunks = ["Hello", " wor", "ld\nsecond line\n", "", " x\r\ny\rz", ": not a comment"]
    scripts["wire"] = Script(chunks, logs={0: "loading\n", 2: "half\nway\n"})
    created = await create(http, server, "wire")
    final = await finished(server, created["id"])
    async with http.get(created["urls"]["stream"]) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        raw = (await resp.read()).decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""  # the stream ends after a complete event
    for block in blocks[:-1]:
        lines = block.split("\n")
        names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        ids = [line for line in lines if line.startswith("id: ")]
        assert len(names) == 1 and names[0] in EVENT_NAMES, block
        assert len(ids) == 1, block
        assert all(line.startswith(("event: ", "id: ", "data: ")) for line in lines), block
    # A multi-line chunk is several data lines; readers join them with "\n".
    assert "event: output\nid: 3-17\ndata: ld\ndata: second line\ndata: \n\n" in raw
    parser_events = [e for block in blocks[:-1] for e in _parse(block + "\n\n")]
    assert [e.event for e in parser_events] == [
        "logs",
        "output",
        "output",
        "logs",
        "output",
        "output",
        "output",
        "output",
        "done",
    ]
    assert [e.data for e in parser_events if e.event == "logs"] == ["loading\n", "half\nway\n"]
    assert parser_events[-1].data == "{}"
    # The text is the output, except that SSE turns "\r\n" and "\r" into "\n".
    assert output_text(parser_events) == SSE_LINE_BREAKS.sub("\n", "".join(final["output"]))
    assert final["output"] == chunks
    ids = [e.id for e in parser_events]
    assert len(set(ids)) == len(ids)


def _parse(text: str) -> list[Event]:
    from tests.test_streams_support import SSEParser

    return SSEParser().feed(text.encode())


async def test_failed_prediction_ends_with_error_then_done(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    scripts["boom"] = Script(["a"], error="the model broke")
    created = await create(http, server, "boom")
    events = await stream_events(http, created["urls"]["stream"])
    assert [e.event for e in events] == ["output", "logs", "error", "done"]
    assert json.loads(events[2].data) == {"detail": "the model broke"}
    assert json.loads(events[3].data) == {"reason": "error"}
    assert events[2].id.endswith("-error") and events[3].id.endswith("-done")
    assert (await finished(server, created["id"]))["status"] == "failed"


async def test_canceled_prediction_ends_with_done_reason_canceled(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    scripts["hold"] = Script(["a", "b"], allowed=1)
    created = await create(http, server, "hold")
    async with asyncio.timeout(30), http.get(created["urls"]["stream"]) as resp:
        events = read_events(resp)
        first = await anext(events)
        assert (first.event, first.data) == ("output", "a")
        async with http.post(created["urls"]["cancel"], headers=AUTH) as cancel:
            assert (await cancel.json())["status"] == "canceled"
        rest = [e async for e in events]
    assert [e.event for e in rest] == ["logs", "done"] or [e.event for e in rest] == ["done"]
    assert json.loads(rest[-1].data) == {"reason": "canceled"}


# -- replay and resume --------------------------------------------------------------------


async def test_late_readers_replay_then_follow_live(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    script = scripts["slow"] = Script(list("abcdef"), allowed=2)
    created = await create(http, server, "slow")
    url = created["urls"]["stream"]
    async with asyncio.timeout(30), http.get(url) as early:
        early_events = read_events(early)
        seen = [await anext(early_events), await anext(early_events)]
        assert output_text(seen) == "ab"
        async with http.get(url) as late:
            late_events = read_events(late)
            # Everything so far at once, then live.
            assert output_text([await anext(late_events), await anext(late_events)]) == "ab"
            script.release(4)
            assert output_text([await anext(early_events), await anext(early_events)]) == "cd"
            assert output_text([await anext(late_events), await anext(late_events)]) == "cd"
            # Resuming after the first event: b, c, d at once, then the rest live.
            async with http.get(url, headers={"Last-Event-ID": seen[0].id}) as resumed:
                resumed_events = read_events(resumed)
                got = [await anext(resumed_events) for _ in range(3)]
                assert output_text(got) == "bcd"
                script.release()
                got += [e async for e in resumed_events]
            assert output_text(got) == "bcdef"
            assert output_text([e async for e in late_events]) == "ef"
        assert output_text([e async for e in early_events]) == "ef"


async def _resume_all(
    http: aiohttp.ClientSession, url: str, events: list[Event]
) -> list[list[Event]]:
    """What a reconnect after each of `events` gets (204 after `done`: an empty list)."""
    rests: list[list[Event]] = []
    for event in events:
        async with http.get(url, headers={"Last-Event-ID": event.id}) as resp:
            if event.event == "done":
                assert resp.status == 204
                assert await resp.read() == b""
                rests.append([])
                continue
            assert resp.status == 200
            rests.append(await collect(resp))
    return rests


def _state(events: list[Event]) -> tuple[str, str, list[tuple[str, str]]]:
    """Output text, log text and closing events: what a reader assembles from `events`."""
    closing = [(e.event, e.data) for e in events if e.event in ("error", "done")]
    logs = "".join(e.data for e in events if e.event == "logs")
    return output_text(events), logs, closing


async def test_last_event_id_resumes_exactly_live_and_after_a_restart(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    chunks = ["one ", "two\n", "three ", "", "four"]
    scripts["resume"] = Script(chunks, logs={0: "start\n", 2: "middle\n", 4: "end\n"}, error="x")
    created = await create(http, server, "resume")
    url = created["urls"]["stream"]
    events = await stream_events(http, url)
    await finished(server, created["id"])
    full = _state(events)
    assert full[0] == "".join(chunks)
    # From the live event log (the prediction is recently finished, kept in memory).
    for k, rest in enumerate(await _resume_all(http, url, events)):
        assert rest == events[k + 1 :], k
    # After a restart the stream is replayed from SQLite: ids mean the same positions, so each
    # resume gets exactly what the reader had not seen, whatever shape the events take.
    await server.stop()
    restarted = await live_server()
    url = url.replace(server.url, restarted.url)
    replayed = await stream_events(http, url)
    assert _state(replayed) == full
    for k, rest in enumerate(await _resume_all(http, url, events)):
        seen = _state(events[: k + 1])
        after = _state(rest)
        assert seen[0] + after[0] == full[0], k
        assert seen[1] + after[1] == full[1], k
        assert seen[2] + after[2] == full[2], k


async def test_a_stream_opened_after_the_end_replays_everything_then_done(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    created = await create(http, server, "x|y|z")
    final = await finished(server, created["id"])
    events = await stream_events(http, created["urls"]["stream"])
    assert output_text(events) == "".join(final["output"]) == "xyz"
    assert events[-1].event == "done"
    async with http.get(created["urls"]["stream"], headers={"Last-Event-ID": events[-1].id}) as r:
        assert r.status == 204


async def test_stream_expires_after_the_configured_time(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server(stream_ttl=0)
    created = await create(http, server, "a|b")
    await finished(server, created["id"])
    async with http.get(created["urls"]["stream"]) as resp:
        assert resp.status == 410
        assert resp.content_type == "application/problem+json"
        body = await resp.json()
        assert body["title"] == "Stream expired"
        assert "fetch the prediction" in body["detail"]


# -- keep-alive ---------------------------------------------------------------------------


async def test_idle_streams_get_ping_comments(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    from tests.test_streams_support import SSEParser

    server = await live_server(stream_ping_interval=0.02)
    script = scripts["idle"] = Script(["a", "b"], allowed=0)
    created = await create(http, server, "idle")
    raw = b""
    parser = SSEParser()
    async with asyncio.timeout(30), http.get(created["urls"]["stream"]) as resp:
        async for chunk in resp.content.iter_any():
            raw += chunk
            assert parser.feed(chunk) == []
            if parser.comments >= 3:
                break
        script.release()
        async for chunk in resp.content.iter_any():
            raw += chunk
    assert b": ping\n\n" in raw
    assert "\r" not in raw.decode()
    events = SSEParser().feed(raw)
    assert [e.event for e in events] == ["output", "output", "done"]


# -- disconnects and POST /v1/run_sse -----------------------------------------------------


async def test_a_disconnect_is_noticed_at_once(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    # Pings are far apart, so only the connection watch can notice the client going.
    server = await live_server(stream_ping_interval=600)
    scripts["idle"] = Script(["a", "b"], allowed=1)
    created = await create(http, server, "idle")
    hub = server.app[STREAM_HUB]
    async with asyncio.timeout(30):
        async with http.get(created["urls"]["stream"]) as resp:
            assert (await anext(read_events(resp))).data == "a"
            assert len(hub) == 1
            resp.connection.transport.abort()  # type: ignore[union-attr]
        await hub.wait_empty()
    assert server.app[keys.PREDICTIONS].live(created["id"]) is not None  # still running


async def _run_sse(
    http: aiohttp.ClientSession, server: LiveServer, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    return await http.post(f"{server.url}/v1/run_sse", json=body, headers=AUTH)


async def test_run_sse_answers_with_the_stream(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    version = server.app[keys.CATALOG].get(*SMOL.split("/"))
    assert version is not None
    async with http.post(
        f"{server.url}/v1/run_sse",
        json={"model": f"{SMOL}:{version.version_id}", "input": {"prompt": "a|b\n|c"}},
        headers=AUTH,
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = await collect(resp)
        prediction_id = resp.headers["X-Prediction-Id"]
    final = await finished(server, prediction_id)
    assert output_text(events) == "".join(final["output"]) == "ab\nc"
    assert [e.event for e in events][-1] == "done"
    # Problems come as problem+json before any stream starts.
    async with http.post(f"{server.url}/v1/run_sse", json={"model": SMOL, "input": {}}) as resp:
        assert resp.status == 401
    async with http.post(
        f"{server.url}/v1/run_sse", json={"model": SMOL, "input": {"max_tokens": 1}}, headers=AUTH
    ) as resp:
        assert resp.status == 422
        assert resp.content_type == "application/problem+json"
    async with http.post(
        f"{server.url}/v1/run_sse", json={"model": "nobody/nothing", "input": {}}, headers=AUTH
    ) as resp:
        assert resp.status == 404


@pytest.mark.parametrize("cancel_on_disconnect", [False, True])
async def test_run_sse_disconnect_cancels_only_when_configured(
    live_server: LiveStarter,
    scripts: Scripts,
    http: aiohttp.ClientSession,
    cancel_on_disconnect: bool,
) -> None:
    server = await live_server(
        run_sse_cancel_on_disconnect=cancel_on_disconnect, stream_ping_interval=600
    )
    script = scripts["hold"] = Script(["a", "b"], allowed=1)
    hub = server.app[STREAM_HUB]
    async with asyncio.timeout(30):
        async with http.post(
            f"{server.url}/v1/run_sse",
            json={"model": SMOL, "input": {"prompt": "hold"}},
            headers=AUTH,
        ) as resp:
            prediction_id = resp.headers["X-Prediction-Id"]
            assert (await anext(read_events(resp))).data == "a"
            resp.connection.transport.abort()  # type: ignore[union-attr]
        await hub.wait_empty()
        if not cancel_on_disconnect:
            script.release()
        prediction = await server.app[keys.PREDICTIONS].wait(prediction_id, 30)
    expected = Status.CANCELED if cancel_on_disconnect else Status.SUCCEEDED
    assert prediction.status is expected
    if cancel_on_disconnect:
        assert "The /v1/run_sse client disconnected." in prediction.logs


async def test_shutdown_ends_open_streams_at_once(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    scripts["hold"] = Script(["a", "b"], allowed=1)
    created = await create(http, server, "hold")
    async with http.get(created["urls"]["stream"]) as resp:
        events = read_events(resp)
        assert (await anext(events)).data == "a"
        # Well inside the 5 s the fixture allows open requests at shutdown.
        async with asyncio.timeout(3):
            await server.stop()
            rest = [e async for e in events]
    assert all(e.event != "output" for e in rest)


async def test_streams_per_token_are_limited_with_429(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server(max_streams_per_token=2, stream_ping_interval=600)
    scripts["idle"] = Script(["a", "b"], allowed=1)
    created = await create(http, server, "idle")
    url = created["urls"]["stream"]
    hub = server.app[STREAM_HUB]
    async with asyncio.timeout(30):
        first = await http.get(url)
        second = await http.get(url)
        try:
            for resp in (first, second):
                assert (await anext(read_events(resp))).data == "a"
            async with http.get(url) as third:
                assert third.status == 429
                assert third.content_type == "application/problem+json"
                assert third.headers["Retry-After"] == "1"
                assert "2 streams" in (await third.json())["detail"]
            # run_sse counts per API token: it has its own two slots, and the third is
            # refused before any prediction is created.
            before = len(
                (await (await http.get(f"{server.url}/v1/predictions", headers=AUTH)).json())[
                    "results"
                ]
            )
            held = [
                await _run_sse(http, server, {"model": SMOL, "input": {"prompt": "idle"}})
                for _ in range(2)
            ]
            refused = await _run_sse(http, server, {"model": SMOL, "input": {"prompt": "idle"}})
            assert [r.status for r in held] == [200, 200] and refused.status == 429
            refused.release()
            listing = await (await http.get(f"{server.url}/v1/predictions", headers=AUTH)).json()
            assert len(listing["results"]) == before + 2
            for resp in held:
                resp.close()
        finally:
            first.close()
        # A slot freed by a closed stream can be used again (bounded wait for the server to
        # notice the close).
        for _ in range(1000):
            if len(hub) <= 1:
                break
            await asyncio.sleep(0.01)
        assert len(hub) == 1
        async with http.get(url) as again:
            assert again.status == 200
            assert (await anext(read_events(again))).data == "a"
        second.close()
