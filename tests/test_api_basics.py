"""The HTTP surface on the tiny model: shapes of every object and every error."""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AUTH

Client = TestClient[web.Request, web.Application]

ID = re.compile(r"^[a-z2-7]{26}$")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


async def test_create_and_get_prediction(client: Client) -> None:
    resp = await client.post(
        "/v1/predictions",
        json={"version": "huggingfacetb/smollm2-135m-instruct", "input": {"prompt": "hi", "max_tokens": 5}},
        headers={**AUTH, "Prefer": "wait"},
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert ID.match(body["id"])
    assert body["status"] == "succeeded"
    assert isinstance(body["output"], list)
    assert TIME.match(body["created_at"]) and TIME.match(body["completed_at"])
    assert body["urls"]["get"].startswith("http://127.0.0.1:")
    got = await (await client.get(f"/v1/predictions/{body['id']}", headers=AUTH)).json()
    assert got["output"] == body["output"]
    assert got["metrics"]["output_token_count"] <= 5
