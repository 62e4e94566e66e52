"""The official Python client (replicate 1.0.7), unchanged, streaming from the real server.

`stream()`, `predictions.create(..., stream=True).stream()` and the async forms must give
the text of the prediction's final output. The client is synchronous (httpx): its calls run
in a thread while the event loop serves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from replicate.client import Client as ReplicateClient

from server import keys
from server.events import PYTHON_CLIENT_LINE_BREAKS
from tests.conftest import TOKEN, LiveStarter
from tests.test_streams_support import LiveServer, Script, Scripts, SSEParser

SMOL = "huggingfacetb/smollm2-135m-instruct"
INPUT = {"prompt": "Tell me a story about a fox.", "max_tokens": 40, "min_tokens": 20}


def as_streamed(output: list[str]) -> str:
    """The final output as a stream carries it to this client (line breaks become \\n)."""
    return PYTHON_CLIENT_LINE_BREAKS.sub("\n", "".join(output))


async def close(client: ReplicateClient) -> None:
    # The client never closes its httpx clients itself (name-mangled private attributes).
    sync_client = getattr(client, "_Client__client", None)
    if sync_client is not None:
        await asyncio.to_thread(sync_client.close)
    async_client = getattr(client, "_Client__async_client", None)
    if async_client is not None:
        await async_client.aclose()


@pytest.fixture
async def server(live_server: LiveStarter) -> LiveServer:
    """The real app on the tiny real model."""
    return await live_server()


@pytest.fixture
async def rc(server: LiveServer) -> AsyncIterator[ReplicateClient]:
    official = ReplicateClient(api_token=TOKEN, base_url=server.url)
    yield official
    await close(official)


async def final_output(server: LiveServer, prediction_id: str) -> list[str]:
    prediction = await server.app[keys.PREDICTIONS].wait(prediction_id, 30)
    assert prediction.status.terminal
    assert isinstance(prediction.output, list)
    return prediction.output


async def test_stream(server: LiveServer, rc: ReplicateClient) -> None:
    """`replicate.stream(...)` is `Client.stream` on the default client."""
    events = await asyncio.to_thread(lambda: list(rc.stream(SMOL, input=INPUT)))
    assert events[-1].event.value == "done" and events[-1].data == "{}"
    assert {e.event.value for e in events} <= {"output", "logs", "done"}
    text = "".join(str(e) for e in events)
    page = await asyncio.to_thread(rc.predictions.list)
    newest = page.results[0]
    output = await final_output(server, newest.id)
    assert len(output) >= 10
    assert text == as_streamed(output)


async def test_module_level_stream(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replicate.stream(...)` itself, configured from the environment as users do."""
    import replicate

    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("REPLICATE_BASE_URL", server.url)
    # The default client builds its httpx client from the environment on first use; start
    # from none, and put back whatever was there after closing ours.
    monkeypatch.setattr(replicate.default_client, "_Client__client", None)
    try:
        events = await asyncio.to_thread(lambda: list(replicate.stream(SMOL, input=INPUT)))
    finally:
        await close(replicate.default_client)
    text = "".join(str(e) for e in events)
    (newest,) = (await server.app[keys.STORE].page(limit=1)).predictions
    assert text == as_streamed(await final_output(server, newest.id))


async def test_prediction_stream(server: LiveServer, rc: ReplicateClient) -> None:
    prediction = await asyncio.to_thread(
        rc.predictions.create, model=SMOL, input=INPUT, stream=True
    )
    events = await asyncio.to_thread(lambda: list(prediction.stream()))
    text = "".join(str(e) for e in events)
    assert text == as_streamed(await final_output(server, prediction.id))
    await asyncio.to_thread(prediction.reload)
    assert isinstance(prediction.output, list)
    assert text == as_streamed(prediction.output)


async def test_async_stream(server: LiveServer, rc: ReplicateClient) -> None:
    prediction = await rc.predictions.async_create(model=SMOL, input=INPUT, stream=True)
    text = "".join([str(e) async for e in prediction.async_stream()])
    assert text == as_streamed(await final_output(server, prediction.id))
    # And the client-level form.
    text = "".join([str(e) async for e in await rc.async_stream(SMOL, input=INPUT)])
    newest = (await rc.predictions.async_list()).results[0]
    assert text == as_streamed(await final_output(server, newest.id))


async def test_failure_raises_with_the_error(live_server: LiveStarter, scripts: Scripts) -> None:
    server = await live_server()
    scripts["boom"] = Script(["partial"], error="the model broke")
    rc = ReplicateClient(api_token=TOKEN, base_url=server.url)
    try:
        prediction = await rc.predictions.async_create(
            model=SMOL, input={"prompt": "boom"}, stream=True
        )
        seen: list[str] = []
        with pytest.raises(RuntimeError) as raised:
            async for event in prediction.async_stream():
                seen.append(str(event))
        assert json.loads(str(raised.value)) == {"detail": "the model broke"}
        assert seen[0] == "partial"
    finally:
        await close(rc)


async def test_expired_stream_is_a_clear_error(live_server: LiveStarter, scripts: Scripts) -> None:
    server = await live_server(stream_ttl=0)
    rc = ReplicateClient(api_token=TOKEN, base_url=server.url)
    try:
        prediction = await rc.predictions.async_create(
            model=SMOL, input={"prompt": "a|b"}, stream=True
        )
        await server.app[keys.PREDICTIONS].wait(prediction.id, 30)
        with pytest.raises(ValueError, match="got 'application/problem\\+json'"):
            [e async for e in prediction.async_stream()]
    finally:
        await close(rc)


async def test_keepalive_comments_are_harmless(live_server: LiveStarter, scripts: Scripts) -> None:
    server = await live_server(stream_ping_interval=0.01)
    script = scripts["idle"] = Script(["waited ", "for ", "this\u2028and\x0cthat"], allowed=0)
    rc = ReplicateClient(api_token=TOKEN, base_url=server.url)
    try:
        prediction = await rc.predictions.async_create(
            model=SMOL, input={"prompt": "idle"}, stream=True
        )
        assert prediction.urls is not None
        reading = asyncio.create_task(
            asyncio.to_thread(lambda: [str(e) for e in prediction.stream()])
        )
        request, _ = await server.stream_requests.get()
        assert request.headers["User-Agent"].startswith("replicate-python/")
        # Another reader opened later; once it has had pings, so has the client's stream.
        parser = SSEParser()
        async with (
            asyncio.timeout(30),
            aiohttp.ClientSession() as http,
            http.get(prediction.urls["stream"]) as resp,
        ):
            async for chunk in resp.content.iter_any():
                parser.feed(chunk)
                if parser.comments >= 3:
                    break
        script.release()
        async with asyncio.timeout(30):
            text = "".join(await reading)
        assert text == "waited for this\nand\nthat"
    finally:
        await close(rc)


def test_input_keys_used_here_exist() -> None:
    """The inputs above are the model's own (a renamed field would skip min_tokens)."""
    from models.catalog import load_schema

    schema = load_schema(
        __import__("pathlib").Path(__file__).resolve().parent.parent
        / "schemas"
        / "huggingfacetb__smollm2-135m-instruct.json"
    )
    properties: dict[str, Any] = schema.input["properties"]
    assert set(INPUT) <= set(properties)
