"""The playground over HTTP: sign-in, sessions, CSRF checks, pages, escaping, `urls.web`."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from server import keys
from server.app import create_app
from server.records import Prediction, Status
from server.web.sessions import COOKIE, SECRET_FILE, SessionSigner
from tests.conftest import AUTH, TOKEN, AiohttpClient, make_config, wait_ready

Client = TestClient[web.Request, web.Application]
SMOL = "huggingfacetb/smollm2-135m-instruct"
WEB = {"X-Replicant-Web": "1"}
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def origin(client: Client) -> dict[str, str]:
    return {"Origin": f"http://{client.host}:{client.port}"}


async def sign_in(client: Client, token: str = TOKEN, next_path: str = "/") -> Any:
    return await client.post(
        "/login",
        data={"token": token, "next": next_path},
        headers=origin(client),
        allow_redirects=False,
    )


async def signed_in(client: Client) -> Client:
    resp = await sign_in(client)
    assert resp.status == 303
    return client


def session_cookie(resp: Any) -> str:
    header = resp.headers["Set-Cookie"]
    match = re.match(rf"{COOKIE}=([^;]*)", header)
    assert match is not None, header
    return match.group(1)


async def api_create(client: Client, **inputs: Any) -> dict[str, Any]:
    resp = await client.post(
        f"/v1/models/{SMOL}/predictions",
        json={"input": {"max_tokens": 2, **inputs}},
        headers={**AUTH, "Prefer": "wait=10"},
    )
    body: dict[str, Any] = await resp.json()
    assert resp.status == 201, body
    return body


# -- signing in ------------------------------------------------------------------------------


async def test_pages_show_the_sign_in_form_until_signed_in(client: Client) -> None:
    for path in ("/", f"/models/{SMOL}", "/predictions", "/predictions/abc"):
        resp = await client.get(path)
        assert resp.status == 401, path
        html = await resp.text()
        assert 'action="/login"' in html and 'name="token"' in html
        assert f'name="next" value="{path}"' in html
        assert TOKEN not in html
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]


async def test_sign_in_sets_a_signed_http_only_strict_cookie(client: Client) -> None:
    resp = await sign_in(client, next_path=f"/models/{SMOL}")
    assert resp.status == 303
    assert resp.headers["Location"] == f"/models/{SMOL}"
    header = resp.headers["Set-Cookie"]
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/" in header
    assert "Max-Age=604800" in header
    assert "Secure" not in header  # plain http on loopback; https gets Secure
    value = session_cookie(resp)
    assert TOKEN not in value and value.count(".") == 4
    page = await client.get("/")
    assert page.status == 200
    html = await page.text()
    for entry in client.app[keys.CATALOG]:
        assert f'href="/models/{entry.ref}"' in html
    assert "Sign out" in html


async def test_wrong_or_missing_token_is_refused(client: Client, caplog: Any) -> None:
    for token in ("r8_wrong", ""):
        resp = await sign_in(client, token=token)
        assert resp.status == 401
        assert "Set-Cookie" not in resp.headers
        assert "not one this server accepts" in await resp.text()
    assert (await client.get("/")).status == 401
    assert "r8_wrong" not in caplog.text
    assert TOKEN not in caplog.text
    await sign_in(client)
    assert TOKEN not in caplog.text


async def test_sign_in_from_another_site_is_refused(client: Client) -> None:
    for headers in ({"Origin": "https://evil.example"}, {"Referer": "http://evil/x"}, {}):
        resp = await client.post(
            "/login", data={"token": TOKEN}, headers=headers, allow_redirects=False
        )
        assert resp.status == 403, headers
        assert "Set-Cookie" not in resp.headers
    resp = await client.post(
        "/login",
        data={"token": TOKEN},
        headers={"Referer": f"http://{client.host}:{client.port}/login"},
        allow_redirects=False,
    )
    assert resp.status == 303


async def test_next_never_leaves_the_server(client: Client) -> None:
    for target in (
        "//evil.example/x",
        "https://evil.example",
        "/\\evil.example",
        "/\t/evil.example",
        "/\n/evil.example",
        "javascript:x",
    ):
        resp = await sign_in(client, next_path=target)
        assert resp.headers["Location"] == "/", target
    resp = await client.get("/login?next=//evil.example", allow_redirects=False)
    assert resp.headers["Location"] == "/"


async def test_forged_or_tampered_cookies_are_refused(client: Client) -> None:
    value = session_cookie(await sign_in(client))
    version, issued, nonce, fingerprint, signature = value.split(".")
    forged = [
        f"{version}.{int(issued) + 1}.{nonce}.{fingerprint}.{signature}",
        f"{version}.{issued}.{nonce}.{fingerprint}.{signature[:-2]}AA",
        f"{version}.{issued}.{nonce}.{fingerprint}",
        "",
        "v1.x.y.z.w",
    ]
    client.session.cookie_jar.clear()
    for cookie in forged:
        resp = await client.get("/", cookies={COOKIE: cookie})
        assert resp.status == 401, cookie
    assert (await client.get("/", cookies={COOKIE: value})).status == 200


async def test_sign_out_clears_the_cookie(client: Client) -> None:
    await signed_in(client)
    resp = await client.post("/logout", headers=origin(client), allow_redirects=False)
    assert resp.status == 303
    assert "Max-Age=0" in resp.headers["Set-Cookie"]
    assert (await client.get("/")).status == 401
    refused = await client.post("/logout", headers={"Origin": "http://evil"})
    assert refused.status == 403


def test_sessions_expire_and_die_with_their_token() -> None:
    now = [1_000_000.0]
    signer = SessionSigner(b"k" * 32, ["r8_a", "r8_b"], lifetime=3600, clock=lambda: now[0])
    value = signer.issue("r8_a")
    session = signer.verify(value)
    assert session is not None and session.expires_at == 1_000_000 + 3600
    now[0] += 3599
    assert signer.verify(value) is not None
    now[0] += 1
    assert signer.verify(value) is None
    # A shorter lifetime applies to cookies already out.
    now[0] = 1_000_000.0
    shorter = SessionSigner(b"k" * 32, ["r8_a"], lifetime=60, clock=lambda: now[0] + 61)
    assert shorter.verify(value) is None
    # The token was removed from the server: its sessions end.
    assert (
        SessionSigner(b"k" * 32, ["r8_b"], lifetime=3600, clock=lambda: now[0]).verify(value)
        is None
    )
    # Another secret: nothing verifies.
    assert (
        SessionSigner(b"j" * 32, ["r8_a"], lifetime=3600, clock=lambda: now[0]).verify(value)
        is None
    )
    # Issued in the future (a clock set back by more than a minute).
    assert (
        signer.verify(
            SessionSigner(b"k" * 32, ["r8_a"], lifetime=3600, clock=lambda: now[0] + 120).issue(
                "r8_a"
            )
        )
        is None
    )


async def test_the_secret_is_kept_and_sessions_survive_a_restart(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_model: Path
) -> None:
    config = make_config(tmp_path, tiny_model)
    first = await aiohttp_client(create_app(config))
    value = session_cookie(await sign_in(first))
    secret = config.data_dir / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(bytes.fromhex(secret.read_text().strip())) == 32
    await first.close()
    second = await aiohttp_client(create_app(config))
    await wait_ready(second.app)
    assert (await second.get("/", cookies={COOKIE: value})).status == 200
    secret.unlink()
    third = await aiohttp_client(create_app(config))
    assert (await third.get("/", cookies={COOKIE: value})).status == 401


# -- the pages' JSON calls -------------------------------------------------------------------


async def test_page_calls_need_the_cookie_the_header_and_this_origin(client: Client) -> None:
    path = f"/web/api/models/{SMOL}/predictions"
    form = {"prompt": "hi", "max_tokens": "2"}
    # No cookie: 401, even with a bearer token (the pages' calls take only the session).
    resp = await client.post(path, data=form, headers={**WEB, **AUTH, **origin(client)})
    assert resp.status == 401
    assert resp.content_type == "application/problem+json"
    await signed_in(client)
    assert (await client.post(path, data=form, headers=origin(client))).status == 403
    evil = await client.post(path, data=form, headers={**WEB, "Origin": "http://evil.example"})
    assert evil.status == 403
    assert (await client.post(path, data=form, headers=WEB)).status == 403  # no origin at all
    resp = await client.post(path, data=form, headers={**WEB, **origin(client)})
    body = await resp.json()
    assert resp.status == 201, body
    assert body["source"] == "web" and body["input"] == {"prompt": "hi", "max_tokens": 2}
    assert body["urls"]["web"].endswith(f"/predictions/{body['id']}")
    assert "stream" in body["urls"]
    got = await client.get(f"/web/api/predictions/{body['id']}", headers=WEB)
    assert (await got.json())["id"] == body["id"]
    assert (await client.get(f"/web/api/predictions/{body['id']}")).status == 403


async def test_the_json_api_still_wants_its_bearer_token(client: Client) -> None:
    await signed_in(client)
    resp = await client.get("/v1/predictions", headers=WEB)
    assert resp.status == 401
    resp = await client.post(
        f"/v1/models/{SMOL}/predictions", json={"input": {"prompt": "x"}}, headers=WEB
    )
    assert resp.status == 401


async def test_invalid_form_input_names_the_fields(client: Client) -> None:
    await signed_in(client)
    resp = await client.post(
        f"/web/api/models/{SMOL}/predictions",
        data={"prompt": "", "max_tokens": "lots", "temperature": "9"},
        headers={**WEB, **origin(client)},
    )
    assert resp.status == 422
    body = await resp.json()
    assert body["invalid_fields"] == [
        {"field": "max_tokens", "message": "must be a number, not 'lots'"}
    ]
    resp = await client.post(
        f"/web/api/models/{SMOL}/predictions",
        data={"prompt": "", "temperature": "9"},
        headers={**WEB, **origin(client)},
    )
    fields = {e["field"]: e["message"] for e in (await resp.json())["invalid_fields"]}
    assert fields == {"prompt": "is required", "temperature": "must be at most 5 (got 9)"}


async def test_uploads_go_through_the_files_api(client: Client) -> None:
    upload = aiohttp.FormData()
    upload.add_field("content", b"\x89PNG fake", filename="pic.png", content_type="image/png")
    refused = await client.post("/web/api/files", data=upload, headers={**WEB, **origin(client)})
    assert refused.status == 401
    await signed_in(client)
    upload = aiohttp.FormData()
    upload.add_field("content", b"\x89PNG fake", filename="pic.png", content_type="image/png")
    resp = await client.post("/web/api/files", data=upload, headers={**WEB, **origin(client)})
    body = await resp.json()
    assert resp.status == 201, body
    assert body["name"] == "pic.png" and body["size"] == 9
    # The same file the API serves, to bearer-token callers only.
    got = await client.get(f"/v1/files/{body['id']}", headers=AUTH)
    assert (await got.json())["urls"]["get"] == body["urls"]["get"]
    assert (await client.get(f"/v1/files/{body['id']}")).status == 401


# -- pages -----------------------------------------------------------------------------------


async def test_model_page_is_the_generated_form(client: Client) -> None:
    await signed_in(client)
    resp = await client.get(f"/models/{SMOL}")
    assert resp.status == 200
    html = await resp.text()
    assert '<textarea id="field-prompt" name="prompt" required' in html
    assert 'type="range" id="field-temperature-range"' in html
    assert 'min="0" max="5" step="0.01"' in html
    assert 'type="checkbox" value="true" id="field-log_performance_metrics"' in html
    assert html.index('data-field="prompt"') < html.index('data-field="system_prompt"')
    assert html.index('data-field="seed"') < html.index('data-field="prompt_template"')
    assert 'aria-describedby="field-prompt-help field-prompt-error"' in html
    assert (await client.get("/models/nobody/nothing")).status == 404


async def test_the_form_works_without_javascript(client: Client) -> None:
    await signed_in(client)
    resp = await client.post(
        f"/models/{SMOL}",
        data={"prompt": "hello", "max_tokens": "3", "temperature": "0.7"},
        headers=origin(client),
        allow_redirects=False,
    )
    assert resp.status == 303
    prediction_id = resp.headers["Location"].removeprefix("/predictions/")
    prediction = await client.app[keys.PREDICTIONS].wait(prediction_id, 10)
    assert prediction.source == "web"
    assert prediction.input == {"prompt": "hello", "max_tokens": 3}
    # A bad value: the form comes back with what was typed and the message at the field.
    resp = await client.post(
        f"/models/{SMOL}", data={"prompt": "again", "max_tokens": "0"}, headers=origin(client)
    )
    assert resp.status == 422
    html = await resp.text()
    assert ">again</textarea>" in html
    assert 'id="field-max_tokens-error">must be at least 1 (got 0)</p>' in html
    assert 'aria-invalid="true"' in html
    refused = await client.post(f"/models/{SMOL}", data={"prompt": "x"})
    assert refused.status == 403


async def test_run_again_starts_from_an_earlier_input(client: Client) -> None:
    await signed_in(client)
    earlier = await api_create(client, prompt="once more", temperature=0.25)
    html = await (await client.get(f"/models/{SMOL}?from={earlier['id']}")).text()
    assert ">once more</textarea>" in html
    assert 'id="field-temperature" name="temperature" ' in html
    assert 'value="0.25"' in html and 'value="2"' in html


async def test_every_urls_web_opens_its_page(client: Client) -> None:
    """`urls.web` of every prediction, from the API and from the playground: its page
    when signed in, the sign-in form otherwise."""
    await api_create(client, prompt="from the api")
    await signed_in(client)
    resp = await client.post(
        f"/web/api/models/{SMOL}/predictions",
        data={"prompt": "from the web", "max_tokens": "2"},
        headers={**WEB, **origin(client)},
    )
    assert resp.status == 201
    listed = await (await client.get("/v1/predictions", headers=AUTH)).json()
    assert len(listed["results"]) == 2
    for wire in listed["results"]:
        url = wire["urls"]["web"]
        assert url == f"http://{client.host}:{client.port}/predictions/{wire['id']}"
        path = url.removeprefix(f"http://{client.host}:{client.port}")
        page = await client.get(path)
        assert page.status == 200
        html = await page.text()
        assert f'data-id="{wire["id"]}"' in html
        assert wire["input"]["prompt"] in html
    client.session.cookie_jar.clear()
    for wire in listed["results"]:
        page = await client.get(wire["urls"]["web"].split(str(client.port), 1)[1])
        assert page.status == 401
        assert 'action="/login"' in await page.text()
    await signed_in(client)
    assert (await client.get("/predictions/doesnotexist")).status == 404
    assert (await client.get("/predictions/NOT-AN-ID")).status == 404


async def test_prediction_page_shows_everything(client: Client) -> None:
    wire = await api_create(client, prompt="show me", log_performance_metrics=True)
    await signed_in(client)
    html = await (await client.get(f"/predictions/{wire['id']}")).text()
    assert 'data-terminal="true"' in html and "status-succeeded" in html
    assert "".join(wire["output"]) in html or not wire["output"]
    for metric in ("predict_time", "total_time", "tokens_per_second"):
        assert f"<dt>{metric}</dt>" in html
    assert "tokens_per_second: " in html  # the logs
    for label in ("Created", "Started", "Completed"):
        assert f"<dt>{label}</dt><dd><time datetime=" in html
    assert 'aria-live="polite"' in html
    assert 'data-action="cancel"' not in html  # finished: nothing to cancel


async def test_cancel_from_the_page_without_javascript(client: Client) -> None:
    await signed_in(client)
    store = client.app[keys.STORE]
    queued = Prediction(id="waitingprediction0000000000", model=SMOL, version="v", input={})
    await store.insert(queued)
    resp = await client.post(
        f"/predictions/{queued.id}/cancel", headers=origin(client), allow_redirects=False
    )
    # Not a live one (it was stored directly): cancel leaves it as it is, and says so by
    # sending the person back to its page.
    assert resp.status == 303 and resp.headers["Location"] == f"/predictions/{queued.id}"
    refused = await client.post(f"/predictions/{queued.id}/cancel", headers={"Origin": "http://e"})
    assert refused.status == 403


async def test_history_pages_through_predictions(client: Client) -> None:
    store = client.app[keys.STORE]
    for i in range(30):
        await store.insert(
            Prediction(id=f"history{i:019d}", model=SMOL, version="v", input={"prompt": f"p{i}"})
        )
    await signed_in(client)
    first = await (await client.get("/predictions")).text()
    ids = re.findall(r'class="history-link" href="/predictions/(history\d+)"', first)
    assert ids == [f"history{i:019d}" for i in range(29, 4, -1)]
    older = re.search(r'rel="next" href="(/predictions\?cursor=[^"]+)"', first)
    assert older is not None and 'rel="prev"' not in first
    second = await (await client.get(older.group(1).replace("&amp;", "&"))).text()
    ids = re.findall(r'class="history-link" href="/predictions/(history\d+)"', second)
    assert ids == [f"history{i:019d}" for i in range(4, -1, -1)]
    assert 'rel="prev"' in second and 'rel="next"' not in second
    assert "status-starting" in second and ">p0</span>" in second
    bad_cursor = await client.get("/predictions?cursor=nonsense", allow_redirects=False)
    assert bad_cursor.status == 303


async def test_nothing_from_a_model_or_a_schema_becomes_markup(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_model: Path
) -> None:
    schema = {
        "Input": {
            "type": "object",
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string", "title": HOSTILE, "description": HOSTILE},
                "mode": {"type": "string", "enum": [HOSTILE, "b"], "default": HOSTILE},
                "note": {"type": "string", "default": '"><script>alert(2)</script>'},
            },
        },
        "Output": {"type": "array", "items": {"type": "string"}, "x-cog-array-type": "iterator"},
    }
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(schema))
    extra = f"""
[[model]]
name = "evil/model"
backend = "ctranslate2"
weights = "{tiny_model}"
schema = "{path}"
description = {json.dumps(HOSTILE)}
"""
    client = await aiohttp_client(create_app(make_config(tmp_path, tiny_model, extra=extra)))
    await wait_ready(client.app)
    stored = Prediction(
        id="hostileprediction000000000",
        model="evil/model",
        version="v",
        input={"prompt": HOSTILE, HOSTILE: HOSTILE},
        status=Status.FAILED,
        output=[HOSTILE, "javascript:alert(3)"],
        logs=HOSTILE,
        error=HOSTILE,
        metrics={HOSTILE: 1},
    )
    await client.app[keys.STORE].insert(stored)
    await signed_in(client)
    pages = [
        await (await client.get(path)).text()
        for path in ("/", "/models/evil/model", f"/predictions/{stored.id}", "/predictions")
    ]
    panel = await client.get(f"/web/api/predictions/{stored.id}/panel", headers=WEB)
    pages.append(await panel.text())
    for html in pages:
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
        assert 'href="javascript:' not in html
    assert '"><script>alert(2)' not in pages[1]
    assert 'value="&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;"' in pages[1]


async def test_a_link_from_another_site_reloads_from_this_one(client: Client) -> None:
    """SameSite=Strict keeps the cookie off a navigation from another site; the page then
    reloads itself (a same-site navigation, which carries the cookie)."""
    resp = await client.get("/predictions/abc?x=1", headers={"Sec-Fetch-Site": "cross-site"})
    assert resp.status == 200
    html = await resp.text()
    assert '<meta http-equiv="refresh" content="0">' in html
    assert 'href="/predictions/abc?x=1"' in html and 'name="token"' not in html
    # From this site, or typed in: the sign-in form.
    for site in ("same-origin", "none"):
        resp = await client.get("/predictions/abc", headers={"Sec-Fetch-Site": site})
        assert resp.status == 401


async def test_head_is_a_safe_method(client: Client) -> None:
    await signed_in(client)
    assert (await client.head("/predictions")).status == 200


async def test_over_https_the_cookie_is_secure(
    aiohttp_client: AiohttpClient, tmp_path: Path, tiny_model: Path
) -> None:
    config = make_config(tmp_path, tiny_model, public_url="https://models.example.com")
    client = await aiohttp_client(create_app(config))
    resp = await client.post(
        "/login",
        data={"token": TOKEN},
        headers={"Origin": "https://models.example.com"},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert "Secure" in resp.headers["Set-Cookie"]


async def test_static_files_are_served(client: Client) -> None:
    html = await (await client.get("/")).text()
    css = re.search(r'href="(/static/playground\.css\?v=[^"]+)"', html)
    js = re.search(r'src="(/static/playground\.js\?v=[^"]+)"', html)
    assert css is not None and js is not None
    for url in (css.group(1), js.group(1)):
        resp = await client.get(url)
        assert resp.status == 200 and len(await resp.read()) > 1000
