"""CORS: stream URLs answer any origin by default; the API only the configured origins."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import AUTH, LiveStarter
from tests.test_streams_support import LiveServer, Scripts, collect, output_text

SMOL = "huggingfacetb/smollm2-135m-instruct"
PAGE = "https://app.example.com"
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def stream_url(http: aiohttp.ClientSession, server: LiveServer) -> str:
    async with http.post(
        f"{server.url}/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": "a|b"}},
        headers=AUTH,
    ) as resp:
        url: str = (await resp.json())["urls"]["stream"]
        return url


async def test_defaults_streams_for_anyone_api_for_no_one(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    url = await stream_url(http, server)
    async with http.get(url, headers={"Origin": PAGE}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in resp.headers
        assert output_text(await collect(resp)) == "ab"
    async with http.options(
        url, headers={"Origin": PAGE, "Access-Control-Request-Method": "GET"}
    ) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert resp.headers["Access-Control-Allow-Methods"] == "GET"
    # The API: no CORS headers, and preflights are refused with a reason.
    async with http.get(f"{server.url}/v1/account", headers={**AUTH, "Origin": PAGE}) as resp:
        assert resp.status == 200
        assert "Access-Control-Allow-Origin" not in resp.headers
    async with http.options(f"{server.url}/v1/predictions", headers=PREFLIGHT) as resp:
        assert resp.status == 403
        assert "Access-Control-Allow-Origin" not in resp.headers
        assert "--cors-api-origins" in (await resp.json())["detail"]
    # Without CORS headers nothing changes for non-browser clients.
    async with http.get(f"{server.url}/v1/account", headers=AUTH) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_configured_origins(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server(cors_api_origins=(PAGE,), cors_stream_origins=(PAGE,))
    async with http.options(f"{server.url}/v1/predictions", headers=PREFLIGHT) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == PAGE
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        assert "Origin" in resp.headers["Vary"]
    async with http.post(
        f"{server.url}/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": "a|b"}},
        headers={**AUTH, "Origin": PAGE},
    ) as resp:
        assert resp.status == 201
        assert resp.headers["Access-Control-Allow-Origin"] == PAGE
        assert "Location" in resp.headers["Access-Control-Expose-Headers"]
        url = (await resp.json())["urls"]["stream"]
    # Errors carry the headers too, or the page could not read them.
    async with http.get(f"{server.url}/v1/account", headers={"Origin": PAGE}) as resp:
        assert resp.status == 401
        assert resp.headers["Access-Control-Allow-Origin"] == PAGE
    async with http.get(
        f"{server.url}/v1/account", headers={"Origin": "https://evil.test"}
    ) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers
    # Streams limited to the listed origin: echoed, never `*`.
    async with http.get(url, headers={"Origin": PAGE}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == PAGE
        assert "Origin" in resp.headers["Vary"]
        assert output_text(await collect(resp)) == "ab"
    async with http.get(url, headers={"Origin": "https://evil.test"}) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers
        await collect(resp)
    # run_sse is an API route.
    async with http.post(
        f"{server.url}/v1/run_sse",
        json={"model": SMOL, "input": {"prompt": "c"}},
        headers={**AUTH, "Origin": PAGE},
    ) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == PAGE
        assert "X-Prediction-Id" in resp.headers["Access-Control-Expose-Headers"]
        assert output_text(await collect(resp)) == "c"
