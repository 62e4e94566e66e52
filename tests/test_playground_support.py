"""Helpers of the playground's browser tests (no tests here): headless Chromium over CDP.

The tests drive Debian's Chromium through the Chrome DevTools Protocol from Python, on the
same event loop as the server under test, so a test can hold the model, type into the page
and check the server's state in one place. Input goes through CDP's `Input` domain (real
mouse clicks at an element's position, real key presses), not through DOM shortcuts.

Chromium starts with the flags of tests/js/browser.mjs and a fresh profile per browser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--remote-debugging-port=0",
    "--remote-debugging-address=127.0.0.1",
)
#: Page script: from now on, note every (status, output length) the page shows, in
#: window.seen (the Chromium and Firefox playground tests check that output streamed in).
RECORD_OUTPUT = """(() => {
  window.seen = [];
  const note = () => {
    const status = document.querySelector("#prediction-status");
    const output = document.querySelector("#prediction-output");
    if (status && output) window.seen.push([status.textContent, output.textContent.length]);
  };
  new MutationObserver(note).observe(document.getElementById("result"), {
    subtree: true, childList: true, characterData: true,
  });
  return true;
})()"""
#: Page expression: true once the prediction shown has ended.
TERMINAL = "document.querySelector('#prediction')?.dataset.terminal === 'true'"
#: Key name -> (code, Windows virtual key code, text it types).
_KEYS = {
    "Enter": ("Enter", 13, "\r"),
    "Tab": ("Tab", 9, ""),
    "Space": ("Space", 32, " "),
    "ArrowDown": ("ArrowDown", 40, ""),
    "ArrowUp": ("ArrowUp", 38, ""),
    "ArrowRight": ("ArrowRight", 39, ""),
    "ArrowLeft": ("ArrowLeft", 37, ""),
    "Home": ("Home", 36, ""),
    "End": ("End", 35, ""),
}
CTRL = 2


class CDPError(Exception):
    pass


def chromium_path() -> str:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found is None:
        pytest.fail(
            "Chromium is missing: install the Debian packages chromium and chromium-driver "
            "(scripts/install_test_deps.sh does, as root)"
        )
    return found


class Browser:
    """One headless Chromium, spoken to over its DevTools WebSocket."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        http: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
        drain: asyncio.Task[None],
    ) -> None:
        self._process = process
        self._drain = drain
        self._http = http
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    @classmethod
    async def launch(cls, profile: Path) -> Browser:
        """Start Chromium with a fresh profile in `profile` (a folder that need not exist)."""
        process = await asyncio.create_subprocess_exec(
            chromium_path(),
            *FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        url = None
        # Chromium says where its DevTools endpoint listens on stderr, once it listens.
        async with asyncio.timeout(30):
            while url is None:
                line = (await process.stderr.readline()).decode(errors="replace")
                if not line:
                    raise CDPError("Chromium exited before it opened its DevTools endpoint")
                if line.startswith("DevTools listening on "):
                    url = line.removeprefix("DevTools listening on ").strip()
        # Keep reading stderr so Chromium never blocks on a full pipe.
        drain = asyncio.create_task(_drain(process.stderr))
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(url, max_msg_size=0)
        return cls(process, http, ws, drain)

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if message.type is not aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                if "id" in data:
                    future = self._pending.pop(data["id"], None)
                    if future is not None and not future.done():
                        future.set_result(data)
                    continue
                page = self.pages.get(data.get("sessionId", ""))
                if page is not None:
                    page._event(data["method"], data.get("params", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CDPError("the DevTools connection closed"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        message_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_json(message)
        async with asyncio.timeout(30):
            answer = await future
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        self.pages[page.session] = page
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.set_viewport(width, height)
        return page

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send("Browser.close")
        await self._ws.close()
        await self._http.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        try:
            async with asyncio.timeout(10):
                await self._process.wait()
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


_WAIT_FOR = """new Promise((resolve, reject) => {
  const deadline = Date.now() + MILLISECONDS;
  let observer, timer;
  const check = () => {
    let value;
    try { value = (PREDICATE); } catch (error) { value = undefined; }
    if (value || Date.now() > deadline) {
      observer.disconnect();
      clearInterval(timer);
      value ? resolve(value) : reject(new Error("timed out waiting for: " + LABEL));
    }
  };
  observer = new MutationObserver(check);
  observer.observe(document, {
    subtree: true, childList: true, attributes: true, characterData: true,
  });
  timer = setInterval(check, 100);
  check();
})"""


class Page:
    """A tab: navigation, script evaluation, clicks and key presses, screenshots.

    `errors` collects uncaught exceptions and console errors (CSP violations included).
    """

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session
        self.errors: list[str] = []
        self._listeners: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", "")) for a in params["args"]))
        elif method == "Log.entryAdded":
            entry = params["entry"]
            # Network entries are the browser noting 4xx answers (the sign-in form is a 401).
            if entry["level"] == "error" and entry["source"] != "network":
                self.errors.append(f"{entry['source']}: {entry['text']}")
        for queue in self._listeners.get(method, []):
            queue.put_nowait(params)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session)

    @contextlib.asynccontextmanager
    async def navigation(self, loads: int = 1) -> AsyncIterator[None]:
        """Wait, after the block, until `loads` pages have loaded since it began."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        listeners = self._listeners.setdefault("Page.loadEventFired", [])
        listeners.append(queue)
        try:
            yield
            async with asyncio.timeout(30):
                for _ in range(loads):
                    await queue.get()
        finally:
            listeners.remove(queue)

    async def goto(self, url: str) -> None:
        async with self.navigation():
            answer = await self.send("Page.navigate", {"url": url})
            if answer.get("errorText"):
                raise CDPError(f"navigating to {url}: {answer['errorText']}")

    async def set_viewport(self, width: int, height: int, *, mobile: bool = False) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (promises are awaited)."""
        answer = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise CDPError(details.get("exception", {}).get("description") or details["text"])
        return answer["result"].get("value")

    async def wait_for(self, predicate: str, within: float = 20) -> Any:
        """The first truthy value of the expression `predicate`, checked on every DOM change
        (and every 100 ms); CDPError after `within` seconds."""
        script = (
            _WAIT_FOR.replace("MILLISECONDS", str(int(within * 1000)))
            .replace("LABEL", json.dumps(predicate))
            .replace("PREDICATE", predicate)
        )
        return await self.evaluate(script)

    async def text(self, selector: str) -> str:
        value = await self.evaluate(
            f"document.querySelector({json.dumps(selector)})?.textContent ?? null"
        )
        if value is None:
            raise AssertionError(f"no element matches {selector}")
        return str(value)

    async def exists(self, selector: str) -> bool:
        return bool(await self.evaluate(f"!!document.querySelector({json.dumps(selector)})"))

    async def click(self, selector: str) -> None:
        """A left click in the middle of the element, as a mouse makes it."""
        point = await self.evaluate(
            f"""(() => {{
              const el = document.querySelector({json.dumps(selector)});
              if (!el) return null;
              el.scrollIntoView({{block: "center"}});
              const r = el.getBoundingClientRect();
              return [r.x + r.width / 2, r.y + r.height / 2];
            }})()"""
        )
        if point is None:
            raise AssertionError(f"no element matches {selector}")
        x, y = point
        await self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    async def focus(self, selector: str) -> None:
        found = await self.evaluate(
            f"""(() => {{
              const el = document.querySelector({json.dumps(selector)});
              if (!el) return false;
              el.focus();
              return document.activeElement === el;
            }})()"""
        )
        if not found:
            raise AssertionError(f"cannot focus {selector}")

    async def fill(self, selector: str, text: str) -> None:
        """Replace the text of a box as typing does (selects it, then types `text`)."""
        await self.focus(selector)
        await self.evaluate("document.activeElement.select()")
        if text:
            await self.send("Input.insertText", {"text": text})
        else:
            await self.press("Backspace")

    async def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in a file input, as the file dialog does (fires `change`)."""
        root = await self.send("DOM.getDocument", {"depth": 0})
        found = await self.send(
            "DOM.querySelector", {"nodeId": root["root"]["nodeId"], "selector": selector}
        )
        if not found.get("nodeId"):
            raise AssertionError(f"no element matches {selector}")
        await self.send(
            "DOM.setFileInputFiles",
            {"nodeId": found["nodeId"], "files": [str(p) for p in paths]},
        )

    async def press(self, key: str, *, modifiers: int = 0) -> None:
        code, virtual, text = _KEYS.get(key, (key, 8 if key == "Backspace" else 0, ""))
        down: dict[str, Any] = {
            "type": "keyDown" if text else "rawKeyDown",
            "key": " " if key == "Space" else key,
            "code": code,
            "windowsVirtualKeyCode": virtual,
            "modifiers": modifiers,
        }
        if text and not modifiers:
            down["text"] = text
        await self.send("Input.dispatchKeyEvent", down)
        await self.send(
            "Input.dispatchKeyEvent",
            {"type": "keyUp", "key": down["key"], "code": code, "windowsVirtualKeyCode": virtual},
        )

    async def screenshot(self, path: Path, *, full_page: bool = False) -> None:
        """A PNG of the viewport, or of the whole page."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = (await self.send("Page.getLayoutMetrics"))["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {"x": 0, "y": 0, "scale": 1, **size}
        shot = await self.send("Page.captureScreenshot", params)
        await asyncio.to_thread(_write, path, base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def artifacts_on_failure(page: Page, name: str) -> AsyncIterator[None]:
    """On failure, keep a screenshot and the HTML of the page in test-artifacts/."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            await page.screenshot(ARTIFACTS / f"{name}-failure.png", full_page=True)
            html = await page.evaluate("document.documentElement.outerHTML")
            await asyncio.to_thread(_write, ARTIFACTS / f"{name}-failure.html", str(html).encode())
            if page.errors:
                console = "\n".join(page.errors).encode()
                await asyncio.to_thread(_write, ARTIFACTS / f"{name}-failure-console.txt", console)
        raise


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
