"""The playground in a real browser: headless Chromium against the real server on loopback.

A person signs in, fills the form generated for the default model (on the tiny model),
moves a slider and ticks a checkbox with the keyboard, runs it and watches the output stream
in; picks from a select on a model whose schema has an enum; cancels a long prediction from
its page while it streams; opens the history; picks a file for a `format: uri` input.
A failure keeps a screenshot, the page's HTML and its console errors in test-artifacts/;
runs also leave desktop and phone screenshots there (docs/img/playground*.png come from
`test_screenshots_on_the_real_model`, see docs/playground.md).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web

from models.catalog import SCHEMAS_DIR
from server import keys
from server.app import create_app
from server.records import Status
from tests.conftest import (
    LLAVA,
    TOKEN,
    LiveStarter,
    make_config,
    make_vlm_config,
    wait_ready,
)
from tests.test_playground_support import (
    ARTIFACTS,
    CTRL,
    RECORD_OUTPUT,
    TERMINAL,
    Browser,
    Page,
    artifacts_on_failure,
)
from tests.test_streams_support import Script, Scripts
from tests.test_vision_generation import png

SMOL = "huggingfacetb/smollm2-135m-instruct"
CHOICES = "replicant/smollm-choices"


def choices_model(tmp_path: Path, weights: Path) -> str:
    """A catalog entry whose schema has an enum (none of the seed schemas does): the default
    model's schema with `top_k` limited to a few choices, on the tiny model."""
    schema = json.loads((SCHEMAS_DIR / "huggingfacetb__smollm2-135m-instruct.json").read_text())
    top_k = schema["Input"]["properties"]["top_k"]
    top_k["enum"] = [0, 1, 40]
    path = tmp_path / "choices.json"
    path.write_text(json.dumps(schema))
    return f"""
[[model]]
name = "{CHOICES}"
backend = "ctranslate2"
weights = "{weights}"
schema = "{path}"
description = "The default model's inputs with top_k as a choice."
[model.settings]
seeded_spare = false
"""


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    launched = await Browser.launch(tmp_path / "chromium-profile")
    yield launched
    await launched.close()


@contextlib.contextmanager
def model_held(app: web.Application, model: str = SMOL) -> Iterator[threading.Event]:
    """Keep the model's one thread busy until the yielded event is set: predictions wait in
    `starting`, exactly as behind a long generation (see tests/test_lifecycle.py)."""
    release = threading.Event()
    app[keys.RUNNERS][model]._executor.submit(release.wait, 30)
    try:
        yield release
    finally:
        release.set()


async def sign_in(page: Page, url: str) -> None:
    """Open `url`, get the sign-in form in its place, sign in with the keyboard."""
    await page.goto(url)
    assert await page.exists("form.login")
    assert TOKEN not in await page.evaluate("document.documentElement.outerHTML")
    await page.fill("#token", TOKEN)
    async with page.navigation():
        await page.press("Enter")
    assert not await page.exists("form.login")


async def record_output(page: Page) -> None:
    """From now on, note every (status, output length) the page shows, in window.seen."""
    await page.evaluate(RECORD_OUTPUT)


async def test_sign_in_fill_the_form_and_watch_it_stream(
    live_server: LiveStarter, browser: Browser, tmp_path: Path, tiny_model: Path
) -> None:
    server = await live_server(extra=choices_model(tmp_path, tiny_model))
    page = await browser.new_page()
    async with artifacts_on_failure(page, "playground-stream"):
        await sign_in(page, f"{server.url}/")
        # The models, with their descriptions.
        listed = await page.text("main")
        for entry in server.app[keys.CATALOG]:
            assert entry.ref in listed
        assert "The default model's inputs with top_k as a choice." in listed
        async with page.navigation():
            await page.click(f'a[href="/models/{SMOL}"]')

        # The generated form: the right control per type, in x-order, required marked.
        names = await page.evaluate(
            "[...document.querySelectorAll('.field')].map(f => f.dataset.field)"
        )
        assert names[:4] == ["prompt", "system_prompt", "max_tokens", "min_tokens"]
        assert await page.evaluate("document.querySelector('#field-prompt').tagName") == "TEXTAREA"
        assert await page.evaluate("document.querySelector('#field-prompt').required")
        assert "(required)" in await page.text('label[for="field-prompt"]')
        slider = await page.evaluate(
            """(() => { const r = document.querySelector('#field-temperature-range');
                return [r.type, r.min, r.max, r.step, r.value]; })()"""
        )
        assert slider == ["range", "0", "5", "0.01", "0.7"]

        await page.fill("#field-prompt", "Tell me about <b>bold</b> & friends")
        await page.fill("#field-max_tokens", "24")
        await page.fill("#field-min_tokens", "24")
        # The slider with the keyboard: Home is its minimum, and the number box follows.
        await page.focus("#field-temperature-range")
        await page.press("Home")
        assert await page.evaluate("document.querySelector('#field-temperature').value") == "0"
        # Arrow keys step it; typing in the box moves the slider.
        await page.press("ArrowRight")
        assert await page.evaluate("document.querySelector('#field-temperature').value") == "0.01"
        await page.fill("#field-temperature", "0")
        assert (
            await page.evaluate("document.querySelector('#field-temperature-range').value") == "0"
        )
        await page.focus("#field-log_performance_metrics")
        await page.press("Space")
        assert await page.evaluate(
            "document.querySelector('#field-log_performance_metrics').checked"
        )

        await record_output(page)
        with model_held(server.app) as release:
            await page.click("#run-button")
            # Admitted and waiting for the model's thread: no output yet, and cancellable.
            await page.wait_for("document.querySelector('#prediction-status')")
            assert await page.text("#prediction-status") in ("starting", "processing")
            assert await page.text("#prediction-output") == ""
            assert await page.exists('#prediction [data-action="cancel"]')
            release.set()
            await page.wait_for(TERMINAL, within=60)

        prediction_id = await page.evaluate("document.querySelector('#prediction').dataset.id")
        prediction = await server.app[keys.PREDICTIONS].get(prediction_id)
        assert prediction is not None and prediction.status is Status.SUCCEEDED
        assert prediction.source == "web"
        # Only what was changed is sent; the model applies its defaults to the rest.
        assert prediction.input == {
            "prompt": "Tell me about <b>bold</b> & friends",
            "max_tokens": 24,
            "min_tokens": 24,
            "temperature": 0,
            "log_performance_metrics": True,
        }
        assert isinstance(prediction.output, list) and len(prediction.output) >= 2
        assert await page.text("#prediction-output") == "".join(prediction.output)
        assert await page.text("#prediction-status") == "succeeded"
        # It streamed: the page showed the output growing while the prediction ran.
        seen = await page.evaluate("window.seen")
        growing = sorted({length for status, length in seen if status == "processing"})
        assert len(growing) >= 2, seen
        assert (
            await page.evaluate(
                "document.querySelector('#prediction-output').getAttribute('aria-live')"
            )
            == "polite"
        )
        assert (
            await page.evaluate(
                "document.querySelector('#prediction-output').getAttribute('aria-busy')"
            )
            == "false"
        )
        assert "tokens_per_second" in await page.text("#prediction-logs")
        metrics = await page.text(f"section[aria-labelledby='metrics-heading-{prediction_id}']")
        assert "predict_time" in metrics and "output_token_count" in metrics
        assert not await page.exists('#prediction [data-action="cancel"]')
        # The input is shown as text, never as markup.
        assert not await page.exists("#prediction b")

        await page.screenshot(ARTIFACTS / "playground-desktop.png")
        await page.set_viewport(390, 844, mobile=True)
        await page.wait_for("window.innerWidth === 390")
        # Nothing is wider than a phone's screen.
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await page.screenshot(ARTIFACTS / "playground-phone.png")
        assert page.errors == []


async def test_select_and_keyboard_only_run(
    live_server: LiveStarter, browser: Browser, tmp_path: Path, tiny_model: Path
) -> None:
    server = await live_server(extra=choices_model(tmp_path, tiny_model))
    page = await browser.new_page()
    async with artifacts_on_failure(page, "playground-select"):
        await sign_in(page, f"{server.url}/models/{CHOICES}")
        # The first Tab reaches the skip link, and focus is visible.
        await page.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
        assert (
            await page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
        )

        options = await page.evaluate(
            "[...document.querySelectorAll('#field-top_k option')].map(o => [o.value, o.selected])"
        )
        assert options == [["0", True], ["1", False], ["40", False]]
        await page.focus("#field-top_k")
        await page.press("ArrowDown")
        assert await page.evaluate("document.querySelector('#field-top_k').value") == "1"
        await page.fill("#field-prompt", "Pick one")
        await page.fill("#field-max_tokens", "4")
        # Ctrl+Enter in the prompt runs the model.
        await page.focus("#field-prompt")
        await page.press("Enter", modifiers=CTRL)
        await page.wait_for(TERMINAL, within=60)
        prediction_id = await page.evaluate("document.querySelector('#prediction').dataset.id")
        prediction = await server.app[keys.PREDICTIONS].get(prediction_id)
        assert prediction is not None
        assert prediction.model == CHOICES
        assert prediction.input == {"prompt": "Pick one", "max_tokens": 4, "top_k": 1}

        # A value the schema refuses: the field says why, and gets the focus.
        await page.fill("#field-max_tokens", "0")
        await page.evaluate("document.querySelector('#field-max_tokens').removeAttribute('min')")
        await page.click("#run-button")
        await page.wait_for("!document.querySelector('#field-max_tokens-error').hidden")
        assert "at least 1" in await page.text("#field-max_tokens-error")
        assert await page.evaluate("document.activeElement.id") == "field-max_tokens"
        assert page.errors == []


async def test_cancel_from_its_page_and_open_the_history(
    scripts: Scripts, live_server: LiveStarter, browser: Browser
) -> None:
    """On the scripted model (the one way to hold a prediction between two chunks)."""
    hostile = '<img src=x onerror="window.pwned=1">'
    script = scripts["long story"] = Script([hostile, " once", " upon", " a time"], allowed=2)
    server = await live_server()
    page = await browser.new_page()
    async with artifacts_on_failure(page, "playground-cancel"):
        await sign_in(page, f"{server.url}/models/{SMOL}")
        await page.fill("#field-prompt", "long story")
        await page.click("#run-button")
        # Mid-stream: two chunks are out, the prediction runs on.
        await page.wait_for(
            "document.querySelector('#prediction-output')?.textContent.endsWith(' once')"
        )
        assert await page.text("#prediction-output") == hostile + " once"
        assert not await page.exists("#prediction-output img")
        prediction_id = await page.evaluate("document.querySelector('#prediction').dataset.id")

        # Its own page (urls.web) picks up the stream where it is.
        async with page.navigation():
            await page.click(f'#prediction-heading a[href="/predictions/{prediction_id}"]')
        await page.wait_for(
            "document.querySelector('#prediction-output').textContent.endsWith(' once')"
        )
        assert await page.text("#prediction-status") in ("starting", "processing")
        await page.click('[data-action="cancel"]')
        await page.wait_for(TERMINAL, within=30)
        assert await page.text("#prediction-status") == "canceled"
        prediction = await server.app[keys.PREDICTIONS].get(prediction_id)
        assert prediction is not None and prediction.status is Status.CANCELED
        assert prediction.output == [hostile, " once"]
        assert await page.evaluate("window.pwned") is None
        script.release()

        # The history lists it, with its status and a link to it.
        async with page.navigation():
            await page.click('nav[aria-label="Main"] a[href="/predictions"]')
        item = await page.text(f'.history-item:has(a[href="/predictions/{prediction_id}"])')
        assert "canceled" in item and SMOL in item and "long story" in item
        async with page.navigation():
            await page.click(f'a[href="/predictions/{prediction_id}"]')
        assert await page.text("#prediction-status") == "canceled"

        # A link from another site arrives without the SameSite=Strict cookie: the page
        # reloads itself from this site, and the cookie comes along.
        link = f'<a id="go" href="{server.url}/predictions/{prediction_id}">open</a>'
        await page.goto("data:text/html," + quote(link))
        async with page.navigation(loads=2):
            await page.click("#go")
        assert await page.text("#prediction-status") == "canceled"
        assert page.errors == []


async def test_browser_sign_out(live_server: LiveStarter, browser: Browser) -> None:
    server = await live_server()
    page = await browser.new_page()
    async with artifacts_on_failure(page, "playground-sign-out"):
        await sign_in(page, f"{server.url}/predictions")
        assert await page.exists("main h1")
        cookies = await page.send("Network.getCookies", {"urls": [server.url]})
        (cookie,) = cookies["cookies"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert TOKEN not in cookie["value"]
        assert await page.evaluate("document.cookie") == ""
        async with page.navigation():
            await page.click(".sign-out button")
        assert await page.exists("form.login")
        await page.goto(f"{server.url}/predictions")
        assert await page.exists("form.login")
        assert page.errors == []


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """The app on a loopback port, as `replicant serve` runs it; yields its URL."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        await wait_ready(app)
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_file_picker_and_list_on_a_vision_model(
    browser: Browser, tmp_path: Path, tiny_vlm: dict[str, Path]
) -> None:
    """A `format: uri` input filled by picking a file (uploaded through the files API) and an
    array of strings typed one per line, on the llava schema and a tiny vision model."""
    app = create_app(make_vlm_config(tmp_path, tiny_vlm))
    picture = tmp_path / "cat.png"
    picture.write_bytes(png((200, 120, 40)))
    async with serving(app) as url:
        page = await browser.new_page()
        async with artifacts_on_failure(page, "playground-files"):
            await sign_in(page, f"{url}/models/{LLAVA}")
            assert await page.evaluate("document.querySelector('#field-image').type") == "url"
            await page.set_files("#field-image-file", [picture])
            await page.wait_for(
                "document.querySelector('#field-image-upload').textContent.startsWith('Uploaded')"
            )
            image_url = await page.evaluate("document.querySelector('#field-image').value")
            assert image_url.startswith(f"{url}/v1/files/")
            await page.fill("#field-prompt", "What colour is it?")
            await page.fill("#field-history", "Look at this <image>\nA picture.")
            await page.fill("#field-max_tokens", "3")
            await page.click("#run-button")
            await page.wait_for(TERMINAL, within=60)
            prediction_id = await page.evaluate("document.querySelector('#prediction').dataset.id")
            prediction = await app[keys.PREDICTIONS].get(prediction_id)
            assert prediction is not None
            assert prediction.status is Status.SUCCEEDED, prediction.error
            assert prediction.input == {
                "image": image_url,
                "prompt": "What colour is it?",
                "history": ["Look at this <image>", "A picture."],
                "max_tokens": 3,
            }
            assert page.errors == []


@pytest.mark.smollm
async def test_screenshots_on_the_real_model(
    browser: Browser, tmp_path: Path, smollm_model: Path
) -> None:
    """The default model for real: the answer streams in; desktop and phone screenshots
    (docs/img/playground.png and playground-phone.png come from this test)."""
    app = create_app(make_config(tmp_path, smollm_model))
    async with serving(app) as url:
        page = await browser.new_page()
        async with artifacts_on_failure(page, "playground-smollm"):
            await sign_in(page, f"{url}/models/{SMOL}")
            await page.fill("#field-prompt", "What is the capital of France?")
            await page.focus("#field-temperature-range")
            await page.press("Home")
            await page.fill("#field-max_tokens", "48")
            await page.click("#run-button")
            await page.wait_for(TERMINAL, within=120)
            assert "Paris" in await page.text("#prediction-output")
            await page.evaluate("window.scrollTo(0, 0)")
            await page.screenshot(ARTIFACTS / "playground-smollm-desktop.png")
            await page.set_viewport(390, 844, mobile=True)
            await page.wait_for("window.innerWidth === 390")
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            await page.evaluate("document.getElementById('result').scrollIntoView()")
            await page.screenshot(ARTIFACTS / "playground-smollm-phone.png")
            assert page.errors == []
