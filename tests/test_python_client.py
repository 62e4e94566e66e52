"""The official `replicate` Python client (1.0.7), unchanged, against the real server.

The client is synchronous (httpx), so each call runs in a thread while the event loop
keeps serving; the async forms run on the loop directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from replicate.client import Client as ReplicateClient
from replicate.exceptions import ReplicateError

from server.app import create_app
from tests.conftest import AUTH, MISTRAL_VERSION, TOKEN, AiohttpClient, make_config, wait_ready

Client = TestClient[web.Request, web.Application]
SMOL = "huggingfacetb/smollm2-135m-instruct"

PREDICTION_FIELDS = {
    "id",
    "model",
    "version",
    "input",
    "output",
    "logs",
    "error",
    "status",
    "created_at",
    "started_at",
    "completed_at",
    "urls",
    "metrics",
    "data_removed",
    "source",
}


@pytest.fixture
async def rc(client: Client) -> AsyncIterator[ReplicateClient]:
    """An official client pointed at the test server; its connections closed afterwards."""
    base = str(client.server.make_url("")).rstrip("/")
    official = ReplicateClient(api_token=TOKEN, base_url=base)
    yield official
    # The client never closes its httpx clients itself (name-mangled private attributes).
    sync_client = getattr(official, "_Client__client", None)
    if sync_client is not None:
        await asyncio.to_thread(sync_client.close)
    async_client = getattr(official, "_Client__async_client", None)
    if async_client is not None:
        await async_client.aclose()


async def test_run_with_version_and_with_name(client: Client, rc: ReplicateClient) -> None:
    version = (await (await client.get(f"/v1/models/{SMOL}", headers=AUTH)).json())[
        "latest_version"
    ]["id"]
    out = await asyncio.to_thread(
        rc.run, f"{SMOL}:{version}", input={"prompt": "hi", "max_tokens": 4}
    )
    # An iterator schema makes run() return a generator of strings.
    chunks = await asyncio.to_thread(list, out)
    assert all(isinstance(c, str) for c in chunks)
    out2 = await asyncio.to_thread(rc.run, SMOL, input={"prompt": "hi", "max_tokens": 4})
    assert all(isinstance(c, str) for c in await asyncio.to_thread(list, out2))
    # Legacy version ids listed in the catalog work as they did on the hosted service.
    out3 = await asyncio.to_thread(
        rc.run,
        f"mistralai/mistral-7b-instruct-v0.1:{MISTRAL_VERSION}",
        input={"prompt": "hi", "max_new_tokens": 3, "temperature": 0},
    )
    assert isinstance("".join(await asyncio.to_thread(list, out3)), str)


async def test_run_without_wait_polls(client: Client, rc: ReplicateClient) -> None:
    out = await asyncio.to_thread(rc.run, SMOL, input={"prompt": "hi", "max_tokens": 3}, wait=False)
    assert isinstance("".join(await asyncio.to_thread(list, out)), str)


async def test_create_get_list_cancel_round_trip(client: Client, rc: ReplicateClient) -> None:
    created = await asyncio.to_thread(
        rc.predictions.create, model=SMOL, input={"prompt": "count", "max_tokens": 8}
    )
    assert created.status in ("starting", "processing", "succeeded")
    assert created.urls is not None
    assert created.urls["get"].endswith(f"/v1/predictions/{created.id}")
    assert "stream" in created.urls
    got = await asyncio.to_thread(rc.predictions.get, created.id)
    assert got.id == created.id and got.model == SMOL
    await asyncio.to_thread(got.wait)
    assert got.status == "succeeded"
    assert got.metrics is not None and got.metrics["predict_time"] >= 0
    raw = await (await client.get(f"/v1/predictions/{created.id}", headers=AUTH)).json()
    assert set(raw) >= PREDICTION_FIELDS
    page = await asyncio.to_thread(rc.predictions.list)
    assert any(p.id == created.id for p in page.results)
    canceled = await asyncio.to_thread(rc.predictions.cancel, created.id)
    assert canceled.status == "succeeded"  # finished predictions come back unchanged


async def test_list_pages_with_absolute_next(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_model: Path
) -> None:
    app = create_app(make_config(tmp_path, tiny_model, page_size=2))
    small = await aiohttp_client(app)
    await wait_ready(app)
    ids = []
    for _ in range(5):
        resp = await small.post(
            f"/v1/models/{SMOL}/predictions",
            json={"input": {"prompt": "x", "max_tokens": 1}},
            headers=AUTH,
        )
        ids.append((await resp.json())["id"])
    base = str(small.server.make_url("")).rstrip("/")
    official = ReplicateClient(api_token=TOKEN, base_url=base)
    try:
        seen: list[str] = []
        page = await official.predictions.async_list()
        while True:
            seen += [p.id for p in page.results]
            if page.next is None:
                break
            assert page.next.startswith(base + "/v1/predictions?")  # absolute, as JS needs
            page = await official.predictions.async_list(page.next)
        assert seen == ids[::-1]  # newest first, each exactly once
        # previous walks back.
        raw = await (await small.get("/v1/predictions", headers=AUTH)).json()
        second = await (await small.get(raw["next"].removeprefix(base), headers=AUTH)).json()
        back = await (await small.get(second["previous"].removeprefix(base), headers=AUTH)).json()
        assert [p["id"] for p in back["results"]] == [p["id"] for p in raw["results"]]
        assert raw["previous"] is None
    finally:
        client_ = getattr(official, "_Client__async_client", None)
        if client_ is not None:
            await client_.aclose()


async def test_wait_and_reload(client: Client, rc: ReplicateClient) -> None:
    p = await asyncio.to_thread(
        rc.predictions.create, model=SMOL, input={"prompt": "x", "max_tokens": 2}, wait=5
    )
    await asyncio.to_thread(p.reload)
    await asyncio.to_thread(p.wait)
    assert p.status == "succeeded" and isinstance(p.output, list)


async def test_async_forms(client: Client, rc: ReplicateClient) -> None:
    out = await rc.async_run(SMOL, input={"prompt": "hi", "max_tokens": 3})
    # With owner/name the client fetches no version, so it returns the output list as is.
    assert isinstance(out, list)
    chunks = out
    assert all(isinstance(c, str) for c in chunks)
    p = await rc.predictions.async_create(model=SMOL, input={"prompt": "x", "max_tokens": 2})
    p = await rc.predictions.async_get(p.id)
    await p.async_wait()
    assert p.status == "succeeded"
    page = await rc.predictions.async_list()
    assert page.results
    canceled = await rc.predictions.async_cancel(p.id)
    assert canceled.id == p.id


async def test_failed_input_raises_replicate_error(client: Client, rc: ReplicateClient) -> None:
    with pytest.raises(ReplicateError) as info:
        await asyncio.to_thread(rc.run, SMOL, input={"max_tokens": 3})
    assert info.value.status == 422
    assert "prompt" in str(info.value.detail)


async def test_account_and_models(client: Client, rc: ReplicateClient) -> None:
    account = await asyncio.to_thread(rc.accounts.current)
    assert account.username
    model = await asyncio.to_thread(rc.models.get, SMOL)
    assert model.latest_version is not None
    schema: dict[str, Any] = model.latest_version.openapi_schema
    assert schema["components"]["schemas"]["Output"]["x-cog-array-type"] == "iterator"
    versions = await asyncio.to_thread(model.versions.list)
    assert versions.results[0].id == model.latest_version.id
