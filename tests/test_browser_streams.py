"""A real browser reads a stream URL: headless Chromium and Firefox, a page on another origin.

The flow of docs/streaming.md: the page's own server (a second aiohttp app on another
loopback port) creates the prediction with the official Python client and hands the page
`urls.stream`; the page opens an `EventSource` on it and listens for `output` and `done`.
Midway the test drops the connection; the browser reconnects with `Last-Event-ID` and must
get exactly the rest, then `done`, then, on its next reconnect, 204, which makes it stop.
The page also calls the API cross-origin, which the server allows for its origin only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from replicate.client import Client as ReplicateClient

from server import keys
from tests.conftest import TOKEN, LiveStarter
from tests.firefox_support import Firefox
from tests.test_streams_support import Script, Scripts

JS = Path(__file__).resolve().parent / "js"
SMOL = "huggingfacetb/smollm2-135m-instruct"
CHROMIUM = "/usr/bin/chromium"

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>replicant stream</title>
<pre id="out"></pre>
<script>
const state = (window.state = {
  text: "", ids: [], opened: 0, errors: [], done: null, finished: false, api: {},
});
const report = (kind) =>
  fetch("/progress", { method: "POST", body: JSON.stringify({ kind, state }) });

async function checkApi(api) {
  // A cross-origin GET: the page may read the 401 only if errors carry CORS headers too.
  const plain = await fetch(`${api}/v1/account`);
  state.api.plain = { status: plain.status, title: (await plain.json()).title };
  // An Authorization header makes the browser send a preflight (OPTIONS) first.
  const preflighted = await fetch(`${api}/v1/account`, {
    headers: { Authorization: "Bearer not-a-token" },
  });
  state.api.preflighted = { status: preflighted.status, title: (await preflighted.json()).title };
}

async function main() {
  const prompt = new URLSearchParams(location.search).get("prompt");
  const response = await fetch("/run_prediction", {
    method: "POST",
    body: JSON.stringify({ prompt }),
  });
  const { url, api } = await response.json();
  await checkApi(api);
  const source = new EventSource(url);
  source.addEventListener("open", () => {
    state.opened += 1;
    report("open");
  });
  source.addEventListener("output", (event) => {
    state.text += event.data;
    state.ids.push(event.lastEventId);
    document.getElementById("out").textContent = state.text;
    report("output");
  });
  source.addEventListener("done", (event) => {
    state.done = event.data;
    state.ids.push(event.lastEventId);
    report("done");
  });
  source.addEventListener("error", () => {
    // A dropped connection (CONNECTING: the browser will reconnect) or the end (CLOSED).
    state.errors.push(source.readyState);
    if (source.readyState === EventSource.CLOSED) state.finished = true;
    report("error");
  });
}

main().catch((error) => {
  state.failure = String(error);
  state.finished = true;
  report("failure");
});
</script>
"""


class PageSite:
    """The page's own web app, on another origin: serves the page, creates predictions with
    the official Python client, and takes the page's progress reports."""

    def __init__(self) -> None:
        self.api_url = ""
        self.origin = ""
        self.created: list[str] = []
        self.reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._runner: web.AppRunner | None = None
        self._client: ReplicateClient | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_post("/run_prediction", self._run_prediction)
        app.router.add_post("/progress", self._progress)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.origin = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._client is not None:
            async_client = getattr(self._client, "_Client__async_client", None)
            if async_client is not None:
                await async_client.aclose()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def _run_prediction(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self._client = self._client or ReplicateClient(api_token=TOKEN, base_url=self.api_url)
        prediction = await self._client.predictions.async_create(
            model=SMOL, input={"prompt": body["prompt"]}, stream=True
        )
        self.created.append(prediction.id)
        assert prediction.urls is not None
        return web.json_response({"url": prediction.urls["stream"], "api": self.api_url})

    async def _progress(self, request: web.Request) -> web.Response:
        self.reports.put_nowait(json.loads(await request.read()))
        return web.Response(status=204)

    async def wait_for(self, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first page state reported that passes `check`."""
        while True:
            state: dict[str, Any] = (await self.reports.get())["state"]
            if check(state):
                return state


@pytest.fixture
async def page_site() -> AsyncIterator[PageSite]:
    site = PageSite()
    await site.start()
    yield site
    await site.stop()


def chromium_path() -> str:
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        pytest.fail(
            "Chromium is missing: install the Debian packages chromium and chromium-driver "
            "(scripts/install_test_deps.sh does, as root)"
        )
    return shutil.which("chromium") or CHROMIUM


async def in_chromium(node_dir: Path, url: str, profile: Path) -> dict[str, Any]:
    """Open `url` in Chromium (tests/js/browser.mjs); the page's final state and console."""
    browser = await asyncio.create_subprocess_exec(
        "node",
        str(JS / "browser.mjs"),
        str(node_dir),
        url,
        str(profile),
        "60000",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "CHROMIUM_PATH": chromium_path(), "HOME": str(profile)},
    )
    try:
        stdout, stderr = await browser.communicate()
    finally:
        if browser.returncode is None:
            browser.kill()
            await browser.wait()
    assert browser.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


async def in_firefox(url: str, profile: Path) -> dict[str, Any]:
    """Open `url` in Firefox (WebDriver BiDi); the page's final state and console."""
    async with Firefox.launch(profile) as firefox:
        await firefox.goto(url)
        state = await firefox.wait_for("window.state?.finished === true && window.state", 60)
        return {"state": state, "console": firefox.console}


@pytest.mark.parametrize("browser", ["chromium", "firefox"])
async def test_event_source_across_origins_resumes_after_a_drop(
    browser: str,
    request: pytest.FixtureRequest,
    live_server: LiveStarter,
    scripts: Scripts,
    page_site: PageSite,
    tmp_path: Path,
) -> None:
    server = await live_server(cors_api_origins=(page_site.origin,))
    page_site.api_url = server.url
    chunks = ["Hello", ", wörld", "\n", "line two 🚀", " and", " the end\n"]
    script = scripts["browser"] = Script(chunks, allowed=3)
    url = f"{page_site.origin}/?prompt=browser"
    profile = tmp_path / f"{browser}-profile"
    if browser == "chromium":
        opened = in_chromium(request.getfixturevalue("node_dir"), url, profile)
    else:
        opened = in_firefox(url, profile)
    page = asyncio.create_task(opened)
    try:
        async with asyncio.timeout(90):
            first, answer = await server.stream_requests.get()
            assert first.headers["Origin"] == page_site.origin
            assert "Last-Event-ID" not in first.headers
            assert answer.headers["Access-Control-Allow-Origin"] == "*"
            assert "Access-Control-Allow-Credentials" not in answer.headers
            state = await page_site.wait_for(lambda s: len(s["ids"]) == 3)
            assert state["text"] == "".join(chunks[:3])
            # Drop the connection mid-stream, as a network would; the rest of the output
            # comes while the browser is away.
            assert first.transport is not None
            first.transport.abort()
            script.release()
            (prediction_id,) = page_site.created
            prediction = await server.app[keys.PREDICTIONS].wait(prediction_id, 30)
            second, _ = await server.stream_requests.get()
            assert second.headers["Last-Event-ID"] == state["ids"][2]
            # After `done` the stream ends; the browser reconnects once more and is told to stop.
            third, answer = await server.stream_requests.get()
            assert third.headers["Last-Event-ID"].endswith("-done")
            assert answer.status == 204
            result = await page
    finally:
        page.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await page
    state = result["state"]
    assert "failure" not in state, result
    assert state["text"] == "".join(prediction.output) == "".join(chunks)
    assert state["done"] == "{}"
    assert state["opened"] == 2
    assert len(set(state["ids"])) == len(state["ids"]) == len(chunks) + 1
    assert state["errors"] == [0, 0, 2]  # dropped, ended after done, then 204: closed
    # The API answers the page's origin, errors and preflights included.
    assert state["api"] == {
        "plain": {"status": 401, "title": "Unauthenticated"},
        "preflighted": {"status": 401, "title": "Unauthenticated"},
    }
    assert ("OPTIONS", "/v1/account", 204) in server.seen
