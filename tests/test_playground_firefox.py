"""The playground in Firefox: sign in, run a model from its form, watch it stream, cancel one.

The same server and pages as tests/test_playground_browser.py (Chromium, with real key
presses and clicks); here Debian's firefox-esr runs them over WebDriver BiDi, to show the
pages, their script and the stream work in Firefox too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server import keys
from server.records import Status
from tests.conftest import TOKEN, LiveStarter
from tests.firefox_support import Firefox
from tests.test_playground_support import RECORD_OUTPUT, TERMINAL
from tests.test_streams_support import Script, Scripts

SMOL = "huggingfacetb/smollm2-135m-instruct"


@pytest.fixture
async def firefox(tmp_path: Path) -> AsyncIterator[Firefox]:
    async with Firefox.launch(tmp_path / "firefox-profile") as browser:
        yield browser


async def sign_in(firefox: Firefox, url: str) -> None:
    await firefox.goto(url)
    assert await firefox.exists("form.login")
    await firefox.fill("#token", TOKEN)
    await firefox.evaluate("(document.querySelector('form.login').requestSubmit(), true)")
    await firefox.wait_for(
        "document.readyState === 'complete' && !document.querySelector('form.login')"
    )


async def test_run_a_model_from_its_form_and_watch_it_stream(
    live_server: LiveStarter, firefox: Firefox
) -> None:
    server = await live_server()
    await sign_in(firefox, f"{server.url}/")
    assert SMOL in await firefox.text("main")
    await firefox.click(f'a[href="/models/{SMOL}"]')
    await firefox.wait_for("!!document.querySelector('#field-prompt')")
    names = await firefox.evaluate(
        "[...document.querySelectorAll('.field')].map(f => f.dataset.field)"
    )
    assert names[:4] == ["prompt", "system_prompt", "max_tokens", "min_tokens"]

    await firefox.fill("#field-prompt", "Tell me a story")
    await firefox.fill("#field-max_tokens", "24")
    await firefox.fill("#field-min_tokens", "24")
    await firefox.fill("#field-temperature", "0")
    # The number box moves its slider, as in Chromium.
    assert await firefox.evaluate("document.querySelector('#field-temperature-range').value") == "0"
    await firefox.evaluate(RECORD_OUTPUT)
    await firefox.click("#run-button")
    await firefox.wait_for(TERMINAL, within=60)

    prediction_id = await firefox.evaluate("document.querySelector('#prediction').dataset.id")
    prediction = await server.app[keys.PREDICTIONS].get(prediction_id)
    assert prediction is not None and prediction.status is Status.SUCCEEDED
    assert prediction.source == "web"
    assert prediction.input == {
        "prompt": "Tell me a story",
        "max_tokens": 24,
        "min_tokens": 24,
        "temperature": 0,
    }
    assert await firefox.text("#prediction-output") == "".join(prediction.output)
    assert await firefox.text("#prediction-status") == "succeeded"
    seen = await firefox.evaluate("window.seen")
    assert any(status == "processing" and length > 0 for status, length in seen), seen
    errors = [line for line in firefox.console if line.startswith("error")]
    assert errors == [], errors


async def test_its_page_streams_and_cancels(
    scripts: Scripts, live_server: LiveStarter, firefox: Firefox
) -> None:
    """`urls.web` opened while the prediction runs: the rest streams in; cancel ends it."""
    script = scripts["long story"] = Script(["once", " upon", " a time"], allowed=1)
    server = await live_server()
    await sign_in(firefox, f"{server.url}/models/{SMOL}")
    await firefox.fill("#field-prompt", "long story")
    await firefox.click("#run-button")
    await firefox.wait_for("document.querySelector('#prediction-output')?.textContent === 'once'")
    prediction_id = await firefox.evaluate("document.querySelector('#prediction').dataset.id")

    await firefox.goto(f"{server.url}/predictions/{prediction_id}")
    await firefox.wait_for("document.querySelector('#prediction-output')?.textContent === 'once'")
    script.release(2)
    await firefox.wait_for(
        "document.querySelector('#prediction-output').textContent === 'once upon'"
    )
    await firefox.click('[data-action="cancel"]')
    await firefox.wait_for(TERMINAL, within=30)
    assert await firefox.text("#prediction-status") == "canceled"
    prediction = await server.app[keys.PREDICTIONS].get(prediction_id)
    assert prediction is not None and prediction.status is Status.CANCELED
    assert prediction.output == ["once", " upon"]
    script.release()
