"""A real webhook receiver for tests: a second aiohttp app on a loopback port.

It records every request (body, headers, arrival time, what it answered), checks each
signature with its own plain-hmac code (not the server's), and can be told to fail the next
N requests, to hang until released, or to redirect. Tests wait on it with `wait_for`, which
wakes on each request instead of polling.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import attrs
from aiohttp import web


@attrs.define(kw_only=True)
class Received:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    #: Loop time of arrival.
    at: float
    #: The status answered; 0 while a hung request has not been answered.
    answered: int = 0
    #: Whether `webhook-signature` matched; None if the receiver had no secret to check with.
    signature_ok: bool | None = None

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """The Standard Webhooks check, written from the spec (reference section 3.2)."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    candidates = headers.get("webhook-signature", "").split()
    return any(c.startswith("v1,") and hmac.compare_digest(c[3:], expected) for c in candidates)


@attrs.frozen
class _Reply:
    kind: str  # "fail", "hang" or "redirect"
    status: int = 500
    headers: Mapping[str, str] = attrs.field(factory=dict)


class WebhookReceiver:
    def __init__(self, *, secret: str | None = None) -> None:
        self.secret = secret
        self.received: list[Received] = []
        self.port = 0
        self._plan: collections.deque[_Reply] = collections.deque()
        self._changed = asyncio.Condition()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (on `port`, or any free one the first time)."""
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._release.clear()

    async def stop(self) -> None:
        """Stop listening (hung requests are released first); `start` again on the same port."""
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url(self, path: str = "/hook", **query: str) -> str:
        assert self.port, "start the receiver first"
        suffix = f"?{urlencode(query)}" if query else ""
        return f"http://127.0.0.1:{self.port}{path}{suffix}"

    # -- what the next requests get ---------------------------------------------------------

    def fail(self, times: int, status: int = 500, headers: Mapping[str, str] | None = None) -> None:
        self._plan.extend(_Reply("fail", status, dict(headers or {})) for _ in range(times))

    def hang(self, times: int) -> None:
        """The next `times` requests get no answer until `release()` (then 200)."""
        self._plan.extend(_Reply("hang") for _ in range(times))

    def redirect(self, times: int, location: str = "/elsewhere") -> None:
        self._plan.extend(_Reply("redirect", 307, {"Location": location}) for _ in range(times))

    def release(self) -> None:
        self._release.set()

    # -- reading what came ------------------------------------------------------------------

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], *, within: float = 15.0
    ) -> list[Received]:
        """Until `predicate(received)` holds; re-checked on every request, bounded in time."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: predicate(self.received))
        return list(self.received)

    def for_prediction(self, prediction_id: str) -> list[Received]:
        return [r for r in self.received if r.json().get("id") == prediction_id]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = Received(
            path=request.path,
            query=dict(request.query),
            headers=headers,
            body=body,
            at=asyncio.get_running_loop().time(),
        )
        if self.secret is not None and "webhook-id" in headers:
            record.signature_ok = verify_signature(self.secret, headers, body)
        reply = self._plan.popleft() if self._plan else None
        response = web.Response(status=200, text="ok")
        if reply is not None and reply.kind == "fail":
            response = web.Response(status=reply.status, text="failing on purpose")
            response.headers.update(reply.headers)
        elif reply is not None and reply.kind == "redirect":
            response = web.Response(status=reply.status, headers=reply.headers)
        self.received.append(record)
        await self._notify()
        if reply is not None and reply.kind == "hang":
            await self._release.wait()
        record.answered = response.status
        await self._notify()
        return response

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
