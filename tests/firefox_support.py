"""Headless Firefox for the browser tests, driven over WebDriver BiDi (no tests here).

Firefox speaks WebDriver BiDi itself (`--remote-debugging-port`), so Debian's firefox-esr
needs neither geckodriver nor a patched build: this module starts it with a fresh profile
whose preferences keep it off the network, opens a BiDi session on its WebSocket, and offers
the few page operations the tests need. Clicks and form input go through the page's DOM
(`element.click()`, `value` plus `input` and `change` events); the keyboard-level tests run
in Chromium (tests/test_playground_browser.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

FIREFOX_NAMES = ("firefox-esr", "firefox")
#: Preferences of the test profile: no first-run pages, no updates, no telemetry, no
#: remote settings or safe-browsing lists; nothing but the pages a test opens.
PREFS = {
    "app.normandy.enabled": False,
    "app.update.enabled": False,
    "app.update.auto": False,
    "browser.aboutwelcome.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.page": 0,
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "extensions.update.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "services.settings.server": "http://127.0.0.1:9/",
    "toolkit.telemetry.enabled": False,
}
_LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")


class BiDiError(Exception):
    pass


def firefox_path() -> str:
    for name in FIREFOX_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    pytest.fail(
        "Firefox is missing: install the Debian package firefox-esr "
        "(scripts/install_test_deps.sh does, as root)"
    )


class Firefox:
    """One headless Firefox with one tab, spoken to over WebDriver BiDi."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read(), name="bidi-reader")
        self.context = ""
        #: Console messages and uncaught errors of the page, as "level: text".
        self.console: list[str] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, profile: Path) -> AsyncIterator[Firefox]:
        _write_profile(profile)
        process = await asyncio.create_subprocess_exec(
            firefox_path(),
            "--headless",
            "--no-remote",
            "--profile",
            str(profile),
            "--remote-debugging-port=0",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={"HOME": str(profile), "PATH": "/usr/bin:/bin", "MOZ_CRASHREPORTER_DISABLE": "1"},
        )
        assert process.stderr is not None
        drain: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(60):
                url = None
                while url is None:
                    line = await process.stderr.readline()
                    if not line:
                        raise BiDiError("Firefox exited before it listened for WebDriver BiDi")
                    if found := _LISTENING.search(line.decode(errors="replace")):
                        url = found.group(1)
            drain = asyncio.create_task(_drain(process.stderr))
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(f"{url}/session", max_msg_size=0) as ws,
            ):
                browser = cls(ws)
                try:
                    await browser.send("session.new", {"capabilities": {}})
                    await browser.send("session.subscribe", {"events": ["log.entryAdded"]})
                    tree = await browser.send("browsingContext.getTree", {})
                    browser.context = tree["contexts"][0]["context"]
                    yield browser
                finally:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(5):
                            await browser.send("browser.close", {})
                    browser._reader.cancel()
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    async with asyncio.timeout(10):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()
            if drain is not None:
                drain.cancel()

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "log.entryAdded":
                entry = data["params"]
                self.console.append(f"{entry.get('level')}: {entry.get('text')}")
        for future in self._pending.values():
            future.set_exception(BiDiError("the connection to Firefox closed"))

    async def send(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        await self._ws.send_str(json.dumps({"id": number, "method": method, "params": params}))
        async with asyncio.timeout(60):
            answer = await future
        if answer.get("type") == "error":
            raise BiDiError(f"{method}: {answer.get('error')}: {answer.get('message')}")
        result: dict[str, Any] = answer["result"]
        return result

    async def goto(self, url: str) -> None:
        await self.send(
            "browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"}
        )

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise), through JSON."""
        result = await self.send(
            "script.evaluate",
            {
                "expression": f"Promise.resolve({expression}).then((v) => JSON.stringify(v))",
                "target": {"context": self.context},
                "awaitPromise": True,
            },
        )
        if result.get("type") == "exception":
            details = result.get("exceptionDetails", {})
            raise BiDiError(f"{expression}: {details.get('text')}")
        value = result["result"]
        return json.loads(value["value"]) if value.get("type") == "string" else None

    async def wait_for(self, predicate: str, within: float = 30) -> Any:
        """Until `predicate` is truthy (after JSON: an element is `{}`, so test with `!!`);
        evaluation errors while a page changes are retried."""
        async with asyncio.timeout(within):
            while True:
                with contextlib.suppress(BiDiError):
                    value = await self.evaluate(predicate)
                    if value:
                        return value
                await asyncio.sleep(0.05)

    async def text(self, selector: str) -> str:
        value = await self.evaluate(f"document.querySelector({json.dumps(selector)}).textContent")
        return str(value)

    async def exists(self, selector: str) -> bool:
        return bool(await self.evaluate(f"!!document.querySelector({json.dumps(selector)})"))

    async def fill(self, selector: str, text: str) -> None:
        await self.evaluate(
            f"""(() => {{
              const field = document.querySelector({json.dumps(selector)});
              field.focus();
              field.value = {json.dumps(text)};
              field.dispatchEvent(new Event("input", {{ bubbles: true }}));
              field.dispatchEvent(new Event("change", {{ bubbles: true }}));
              return true;
            }})()"""
        )

    async def click(self, selector: str) -> None:
        await self.evaluate(f"(document.querySelector({json.dumps(selector)}).click(), true)")


def _write_profile(profile: Path) -> None:
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "user.js").write_text(
        "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items())
    )


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass
