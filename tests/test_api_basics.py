"""The HTTP surface on the tiny model: shapes of every object and every error."""

from __future__ import annotations

import io
import re

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AUTH, AppStarter

Client = TestClient[web.Request, web.Application]

ID = re.compile(r"^[a-z2-7]{26}$")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


async def test_create_and_get_prediction(client: Client) -> None:
    resp = await client.post(
        "/v1/predictions",
        json={
            "version": "huggingfacetb/smollm2-135m-instruct",
            "input": {"prompt": "hi", "max_tokens": 5},
        },
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


async def _problem(resp: object, status: int) -> dict[str, object]:
    from aiohttp import ClientResponse

    assert isinstance(resp, ClientResponse)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in body["detail"]
    return dict(body)


async def test_missing_and_wrong_token_are_401(client: Client) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        for method, path in (
            ("GET", "/v1/predictions"),
            ("POST", "/v1/predictions"),
            ("GET", "/v1/models"),
            ("GET", "/v1/account"),
        ):
            resp = await client.request(method, path, headers=headers)
            body = await _problem(resp, 401)
            assert body["title"] == "Unauthenticated"


async def test_token_scheme_is_accepted(client: Client) -> None:
    resp = await client.get(
        "/v1/account", headers={"Authorization": "Token r8_test-token-0123456789"}
    )
    assert resp.status == 200
    assert (await resp.json())["username"]


async def test_malformed_json_is_400(client: Client) -> None:
    for raw in (b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"):
        resp = await client.post(
            "/v1/predictions", data=raw, headers={**AUTH, "Content-Type": "application/json"}
        )
        await _problem(resp, 400)


async def test_unknown_model_and_version_are_404(client: Client) -> None:
    for version in ("nobody/nothing", "huggingfacetb/smollm2-135m-instruct:" + "0" * 64, "f" * 64):
        resp = await client.post(
            "/v1/predictions", json={"version": version, "input": {"prompt": "x"}}, headers=AUTH
        )
        await _problem(resp, 404)
    resp = await client.post(
        "/v1/models/nobody/nothing/predictions", json={"input": {}}, headers=AUTH
    )
    await _problem(resp, 404)
    await _problem(await client.get("/v1/models/nobody/nothing", headers=AUTH), 404)
    await _problem(
        await client.get("/v1/models/meta/meta-llama-3-8b-instruct/versions/abc", headers=AUTH), 404
    )


async def test_unknown_prediction_is_404(client: Client) -> None:
    for path in (
        "/v1/predictions/aaaaaaaaaaaaaaaaaaaaaaaaaa",
        "/v1/predictions/..%2f..",
        "/v1/predictions/%00",
    ):
        await _problem(await client.get(path, headers=AUTH), 404)
    await _problem(
        await client.post("/v1/predictions/aaaaaaaaaaaaaaaaaaaaaaaaaa/cancel", headers=AUTH), 404
    )


async def test_unknown_route_and_method(client: Client) -> None:
    await _problem(await client.get("/v1/nothing-here", headers=AUTH), 404)
    await _problem(await client.delete("/v1/predictions", headers=AUTH), 405)


async def test_missing_version_is_422(client: Client) -> None:
    body = await _problem(
        await client.post("/v1/predictions", json={"input": {}}, headers=AUTH), 422
    )
    assert "version" in str(body["detail"])


async def test_schema_violations_name_every_field(client: Client) -> None:
    resp = await client.post(
        "/v1/models/meta/meta-llama-3-8b-instruct/predictions",
        json={"input": {"temperature": 9, "top_p": "high", "max_tokens": 0, "top_k": 1.5}},
        headers=AUTH,
    )
    body = await _problem(resp, 422)
    fields = {e["field"] for e in body["invalid_fields"]}  # type: ignore[attr-defined]
    assert fields == {"prompt", "temperature", "top_p", "max_tokens", "top_k"}
    assert "prompt: is required" in str(body["detail"])
    assert "temperature: must be at most 5" in str(body["detail"])


async def test_input_strings_longer_than_the_limit_are_422(start_app: AppStarter) -> None:
    client = await start_app(max_input_chars=100)
    url = "/v1/models/meta/meta-llama-3-8b-instruct/predictions"
    long_prompt = "x" * 101
    resp = await client.post(
        url,
        json={"input": {"prompt": long_prompt, "system_prompt": "y" * 500}},
        headers=AUTH,
    )
    body = await _problem(resp, 422)
    assert {e["field"] for e in body["invalid_fields"]} == {"prompt", "system_prompt"}  # type: ignore[attr-defined]
    assert "prompt: is longer than 100 characters (101)" in str(body["detail"])
    assert long_prompt not in str(body)  # the input is named, not echoed
    resp = await client.post(
        url, json={"input": {"prompt": "x" * 100, "max_tokens": 1}}, headers=AUTH
    )
    assert resp.status == 201, await resp.text()


async def test_input_must_be_an_object(client: Client) -> None:
    resp = await client.post(
        "/v1/predictions",
        json={"version": "meta/meta-llama-3-8b-instruct", "input": "hi"},
        headers=AUTH,
    )
    body = await _problem(resp, 422)
    assert "input" in str(body["detail"])


async def test_both_token_names_is_422(client: Client) -> None:
    resp = await client.post(
        "/v1/models/meta/meta-llama-3-8b-instruct/predictions",
        json={"input": {"prompt": "x", "max_tokens": 5, "max_new_tokens": 5}},
        headers=AUTH,
    )
    body = await _problem(resp, 422)
    assert "max_new_tokens" in str(body["detail"])


async def test_template_without_prompt_is_422(client: Client) -> None:
    resp = await client.post(
        "/v1/models/meta/meta-llama-3-8b-instruct/predictions",
        json={"input": {"prompt": "x", "prompt_template": "no placeholder"}},
        headers=AUTH,
    )
    body = await _problem(resp, 422)
    assert "prompt_template" in str(body["detail"])


async def test_bad_webhook_fields_are_422(client: Client) -> None:
    for extra in (
        {"webhook": "ftp://x"},
        {"webhook": "not a url"},
        {"webhook": 5},
        {"webhook": "https://ok.example", "webhook_events_filter": ["start", "bogus"]},
        {"stream": "yes"},
    ):
        resp = await client.post(
            "/v1/predictions",
            json={"version": "meta/meta-llama-3-8b-instruct", "input": {"prompt": "x"}, **extra},
            headers=AUTH,
        )
        await _problem(resp, 422)


async def test_body_too_large_is_413(client: Client) -> None:
    limit = client.app[__import__("server.keys", fromlist=["CONFIG"]).CONFIG].max_body_bytes
    resp = await client.post(
        "/v1/predictions",
        data=io.BytesIO(b'{"input": {"prompt": "' + b"a" * (limit + 10) + b'"}}'),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    await _problem(resp, 413)


async def test_bad_cursor_is_400(client: Client) -> None:
    await _problem(await client.get("/v1/predictions?cursor=%%%", headers=AUTH), 400)
    await _problem(await client.get("/v1/predictions?created_after=yesterday", headers=AUTH), 400)
