"""The pieces `WebhookService` is built from: a lane per prediction, and the request slots.

A `Lane` holds one prediction's webhook work in order: rendered intermediate webhooks, an
output/logs event the throttle held back, and the durable `completed` delivery. One task
serves each lane, so a prediction's webhooks never overtake each other.

`RequestSlots` bounds the requests in flight: a few per receiving host, taken first, then one
of the shared ones. A host that hangs fills only its own slots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import attrs

from server.records import Prediction
from server.webhooks.deliveries import Delivery

log = logging.getLogger(__name__)

UPDATE_EVENTS = ("output", "logs")


@attrs.frozen
class Message:
    """An intermediate webhook, rendered: sent once, as it is."""

    event: str
    body: bytes


@attrs.define(eq=False, kw_only=True)
class Lane:
    prediction_id: str
    url: str
    #: The live prediction, to render held-back updates from; None for rows from SQLite.
    prediction: Prediction | None = None
    #: Rendered intermediate webhooks waiting to be sent, oldest first.
    queued: collections.deque[Message] = attrs.field(factory=collections.deque)
    #: An output/logs event the throttle held back: rendered when the throttle opens.
    held_back: str | None = None
    #: Loop time before which no output/logs webhook may be rendered or sent.
    update_after: float = 0.0
    #: The prediction has ended; the lane closes once nothing is left to send.
    ended: bool = False
    #: The `completed` row is being written; the lane must wait for it.
    completing: bool = False
    completed: Delivery | None = None
    #: Set whenever the listener changes any of the above.
    wakeup: asyncio.Event = attrs.field(factory=asyncio.Event)

    @property
    def host(self) -> str:
        """Scheme, host and port: what request slots are counted per."""
        parts = urlsplit(self.url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        return f"{parts.scheme}://{parts.hostname}:{port}"

    def update_queued(self) -> bool:
        return any(m.event in UPDATE_EVENTS for m in self.queued)

    async def wait(self, at_most: float | None) -> None:
        """Until the listener has news for this lane, or `at_most` seconds."""
        self.wakeup.clear()
        if at_most is not None and at_most <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most):
                await self.wakeup.wait()


class RateLimitedWarning:
    """Logs a warning at most once per `every` seconds, counting those it held back."""

    def __init__(self, every: float = 10.0) -> None:
        self._every = every
        self._next = 0.0
        self._held = 0

    def __call__(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message += " (and %d similar warnings in the last %g s)"
            args = (*args, self._held, self._every)
        log.warning(message, *args)
        self._next = now + self._every
        self._held = 0


@attrs.define(eq=False)
class _HostSlots:
    semaphore: asyncio.Semaphore
    users: int = 0


class RequestSlots:
    """At most `total` requests in flight, and at most `per_host` to any one host."""

    def __init__(self, *, total: int, per_host: int) -> None:
        self._total = total
        self._per_host = per_host
        self._shared = asyncio.Semaphore(total)
        self._hosts: dict[str, _HostSlots] = {}
        self._warn = RateLimitedWarning()

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        """Hold a slot for one request to `host`; waiting is logged, never refused."""
        slots = self._hosts.get(host)
        if slots is None:
            slots = self._hosts[host] = _HostSlots(asyncio.Semaphore(self._per_host))
        slots.users += 1
        try:
            if slots.semaphore.locked():
                self._warn(
                    "%d webhook requests to %s are in flight; more wait for them",
                    self._per_host,
                    host,
                )
            async with slots.semaphore:
                if self._shared.locked():
                    self._warn(
                        "all %d webhook request slots are busy; deliveries wait their turn",
                        self._total,
                    )
                async with self._shared:
                    yield
        finally:
            slots.users -= 1
            if slots.users == 0:
                del self._hosts[host]


def redact(url: str) -> str:
    """A webhook URL without its query or credentials, which may hold secrets."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"
