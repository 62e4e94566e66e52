"""WebhookService: prediction events in, signed webhook requests out, one lane per prediction.

`on_prediction_event` is a `PredictionService` listener: it runs on the event loop in the
middle of generation, so it only renders bodies and updates in-memory state, never awaits.
Each prediction with webhook work gets a `Lane`, served by its own task, which sends that
prediction's webhooks one at a time, in order, so `completed` is always the last a receiver
gets. Lanes share a bounded number of request slots, and a bounded number per receiving host,
so a slow receiver holds up its own webhooks and no one else's.

- `start`: rendered when the prediction starts, sent once.
- `output`/`logs`: at most one per `throttle` seconds per prediction. When the throttle
  allows, the latest state is rendered at once; otherwise the lane renders the latest state
  when the throttle opens. An update not yet rendered when the prediction ends is dropped:
  only the `completed` webhook carries a terminal state.
- `completed`: written to the outbox (committed) first, then sent, and retried on
  connection errors, timeouts, 429 and 5xx until `retry_window` has passed. The row
  survives restarts: pending rows are loaded again at startup.

At most `backlog` lanes exist; past that, `completed` rows wait in the outbox table (loaded
as lanes finish) and intermediate webhooks are dropped. Both are logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import attrs

from server.records import Prediction
from server.store import PredictionStore
from server.webhooks.deliveries import Attempt, Delivery, DeliveryStatus
from server.webhooks.lanes import (
    UPDATE_EVENTS,
    Lane,
    Message,
    RateLimitedWarning,
    RequestSlots,
    redact,
)
from server.webhooks.outbox import WebhookOutbox
from server.webhooks.recovery import queue_missed_completions
from server.webhooks.sender import WebhookSender, settle
from server.webhooks.signing import new_webhook_id

log = logging.getLogger(__name__)

Outcome = Literal["delivered", "retrying", "failed"]
_OUTCOMES: dict[DeliveryStatus, Outcome] = {
    DeliveryStatus.DELIVERED: "delivered",
    DeliveryStatus.PENDING: "retrying",
    DeliveryStatus.FAILED: "failed",
}


@attrs.frozen(kw_only=True)
class WebhookSettings:
    """The `webhook_*` fields of `server.config.Config`, documented there."""

    throttle: float = 0.5
    retry_window: float = 300.0
    retry_delay: float = 1.0
    concurrency: int = 32
    host_concurrency: int = 8
    backlog: int = 1000
    retention: float = 7 * 24 * 3600.0

    @property
    def kept_for(self) -> float:
        """Seconds finished deliveries are kept: never less than twice the retry window, so
        that restart recovery (which looks back one window) always finds a delivery's row."""
        return max(self.retention, 2 * self.retry_window)


#: How often finished deliveries past their retention are deleted, in seconds.
PRUNE_INTERVAL = 3600.0


@attrs.frozen(kw_only=True)
class DeliveryReport:
    """What observers hear after every attempt (tests and metrics subscribe)."""

    webhook_id: str
    prediction_id: str
    event: str
    attempt: int
    result: Attempt
    outcome: Outcome


class WebhookService:
    def __init__(
        self,
        outbox: WebhookOutbox,
        sender: WebhookSender,
        store: PredictionStore,
        *,
        base_url: str,
        settings: WebhookSettings,
        rng: random.Random | None = None,
    ) -> None:
        self.outbox = outbox
        self.observers: list[Callable[[DeliveryReport], None]] = []
        self._sender = sender
        self._store = store
        self._base_url = base_url
        self._settings = settings
        self._rng = rng or random.Random()
        self._lanes: dict[str, Lane] = {}
        self._lane_tasks: set[asyncio.Task[None]] = set()
        #: Tasks writing `completed` rows; awaited (not cancelled) on close.
        self._writes: set[asyncio.Task[None]] = set()
        self._slots = RequestSlots(total=settings.concurrency, per_host=settings.host_concurrency)
        #: Serialises writing `completed` rows with loading them back from the outbox.
        self._admission = asyncio.Lock()
        #: Pending outbox rows from this seq on may have no lane yet (0: load all at start).
        self._spill_from: int | None = 0
        self._refill_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._closed = False
        self._warn_full = RateLimitedWarning()
        self._warn_failed = RateLimitedWarning()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Queue what the last run left undone, then load pending deliveries into lanes."""
        await queue_missed_completions(
            self._store, self.outbox, self._render, retry_window=self._settings.retry_window
        )
        await self._refill()
        self._update_idle()
        self._prune_task = asyncio.create_task(self._prune_forever(), name="webhook-prune")

    async def close(self) -> None:
        """Stop sending. Rows being written are finished; unsent deliveries stay pending."""
        self._closed = True
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        tasks = list(self._lane_tasks)
        if self._refill_task is not None:
            tasks.append(self._refill_task)
        if self._prune_task is not None:
            tasks.append(self._prune_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def prune(self) -> int:
        """Delete finished deliveries (and their attempts) older than the retention."""
        removed = await self.outbox.prune(finished_before=time.time() - self._settings.kept_for)
        if removed:
            log.info("removed %d finished webhook deliveries past their retention", removed)
        return removed

    async def _prune_forever(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:  # a failed cleanup must not stop deliveries; try again later
                log.exception("pruning old webhook deliveries failed")
            await asyncio.sleep(PRUNE_INTERVAL)

    async def wait_idle(self) -> None:
        """Until nothing is waiting to be sent or retried (tests use it to synchronise)."""
        while not self._idle.is_set():
            await self._idle.wait()

    @property
    def backlog(self) -> int:
        """Predictions whose webhooks are in memory now."""
        return len(self._lanes)

    # -- the listener -----------------------------------------------------------------------

    def on_prediction_event(self, prediction: Prediction, event: str) -> None:
        """Called by PredictionService on the event loop; must not block or await."""
        url = prediction.webhook
        if self._closed or url is None:
            return
        wanted = event in prediction.webhook_events_filter
        lane = self._lanes.get(prediction.id)
        if event == "completed":
            if lane is not None:
                lane.ended = True
                lane.held_back = None
                lane.completing = wanted
                lane.wakeup.set()
            if wanted:
                self._write(self._add_completed(prediction.id, url, self._render(prediction)))
            return
        if not wanted or event not in ("start", *UPDATE_EVENTS):
            return
        if lane is None:
            lane = self._open_lane(prediction.id, url, prediction=prediction)
            if lane is None:
                self._warn_full(
                    "webhook backlog is full (%d predictions): dropped the %s webhook of %s",
                    len(self._lanes),
                    event,
                    prediction.id,
                )
                return
        if event == "start":
            lane.queued.append(Message(event, self._render(prediction)))
        elif lane.update_queued() or asyncio.get_running_loop().time() < lane.update_after:
            lane.held_back = event
        else:
            self._queue_update(lane, prediction, event)
        lane.wakeup.set()

    def _render(self, prediction: Prediction) -> bytes:
        # The same bytes `GET /v1/predictions/{id}` answers with (server.http.json_response).
        return json.dumps(prediction.to_wire(self._base_url)).encode()

    def _queue_update(self, lane: Lane, prediction: Prediction, event: str) -> None:
        lane.queued.append(Message(event, self._render(prediction)))
        lane.held_back = None
        lane.update_after = asyncio.get_running_loop().time() + self._settings.throttle

    # -- lanes ------------------------------------------------------------------------------

    def _open_lane(
        self,
        prediction_id: str,
        url: str,
        *,
        prediction: Prediction | None = None,
        completed: Delivery | None = None,
    ) -> Lane | None:
        if self._closed or len(self._lanes) >= self._settings.backlog:
            return None
        lane = Lane(prediction_id=prediction_id, url=url, prediction=prediction)
        if completed is not None:
            lane.completed, lane.ended = completed, True
        self._lanes[prediction_id] = lane
        self._idle.clear()
        task = asyncio.create_task(self._run(lane), name=f"webhooks-{prediction_id}")
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)
        return lane

    async def _run(self, lane: Lane) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if lane.queued:
                    await self._send_once(lane, lane.queued.popleft())
                elif lane.completed is not None:
                    await self._deliver(lane, lane.completed)
                    return
                elif lane.held_back is not None:
                    await lane.wait(lane.update_after - loop.time())
                    prediction = lane.prediction
                    if lane.held_back is None or loop.time() < lane.update_after:
                        continue
                    if prediction is None or prediction.status.terminal:
                        # Ending, and the `completed` event is on its way: it carries this.
                        lane.held_back = None
                        continue
                    self._queue_update(lane, prediction, lane.held_back)
                elif lane.ended and not lane.completing:
                    return
                else:
                    await lane.wait(None)
        except Exception:
            log.exception("webhook lane of %s failed", lane.prediction_id)
        finally:
            if self._lanes.get(lane.prediction_id) is lane:
                del self._lanes[lane.prediction_id]
            self._maybe_refill()
            self._update_idle()

    async def _send_once(self, lane: Lane, message: Message) -> None:
        """An intermediate webhook: one attempt, recorded only if it failed."""
        webhook_id = new_webhook_id()
        async with self._slots.slot(lane.host):
            if message.event in UPDATE_EVENTS:
                # Space the requests too, not only the renders (a slow slot may bunch them).
                loop_now = asyncio.get_running_loop().time()
                lane.update_after = max(lane.update_after, loop_now + self._settings.throttle)
            result = await self._sender.post(lane.url, webhook_id, message.body)
        outcome: Outcome = "delivered" if result.succeeded else "failed"
        self._report(webhook_id, lane.prediction_id, message.event, 1, result, outcome)
        if result.succeeded:
            return
        self._warn_failed(
            "the %s webhook of %s to %s failed (intermediate webhooks are not retried): %s",
            message.event,
            lane.prediction_id,
            redact(lane.url),
            result.describe(),
        )
        try:
            await self.outbox.add_failed_once(
                webhook_id=webhook_id,
                prediction_id=lane.prediction_id,
                event=message.event,
                url=lane.url,
                attempt=result,
            )
        except Exception:
            log.exception("could not record a failed webhook of %s", lane.prediction_id)

    async def _deliver(self, lane: Lane, delivery: Delivery) -> None:
        """The `completed` webhook: attempts until delivered, refused or out of time."""
        while delivery.status is DeliveryStatus.PENDING:
            wait = delivery.next_attempt_at - time.time()
            if wait > 0:
                await asyncio.sleep(wait)  # a retry's backoff (or Retry-After), not a poll
            async with self._slots.slot(lane.host):
                result = await self._sender.post(delivery.url, delivery.id, delivery.body.encode())
            now = time.time()
            settle(delivery, result, first_retry=self._settings.retry_delay, rng=self._rng, now=now)
            try:
                await self.outbox.record_attempt(delivery, result)
            except Exception:
                log.exception("could not record a webhook attempt of %s", lane.prediction_id)
            self._report(
                delivery.id,
                delivery.prediction_id,
                "completed",
                delivery.attempts,
                result,
                _OUTCOMES[delivery.status],
            )
            if delivery.status is DeliveryStatus.PENDING:
                log.info(
                    "completed webhook of %s: attempt %d failed (%s); retrying in %.1f s",
                    delivery.prediction_id,
                    delivery.attempts,
                    result.describe(),
                    delivery.next_attempt_at - now,
                )
        if delivery.status is DeliveryStatus.FAILED:
            await self._note_failure(delivery)

    async def _note_failure(self, delivery: Delivery) -> None:
        note = (
            f"Webhook delivery to {redact(delivery.url)} failed after {delivery.attempts} "
            f"attempt{'s' if delivery.attempts != 1 else ''}: {delivery.last_error}\n"
        )
        log.warning("prediction %s: %s", delivery.prediction_id, note.strip())
        try:
            # The prediction has finished, so its logs live in the store only.
            await self._store.append_logs(delivery.prediction_id, note)
        except Exception:
            log.exception("could not note the webhook failure of %s", delivery.prediction_id)

    def _report(
        self,
        webhook_id: str,
        prediction_id: str,
        event: str,
        attempt: int,
        result: Attempt,
        outcome: Outcome,
    ) -> None:
        report = DeliveryReport(
            webhook_id=webhook_id,
            prediction_id=prediction_id,
            event=event,
            attempt=attempt,
            result=result,
            outcome=outcome,
        )
        for observer in self.observers:
            try:
                observer(report)
            except Exception:
                log.exception("webhook observer failed")

    # -- the outbox -------------------------------------------------------------------------

    def _write(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._writes.add(task)
        self._idle.clear()

        def done(task: asyncio.Task[None]) -> None:
            self._writes.discard(task)
            self._update_idle()

        task.add_done_callback(done)

    async def _add_completed(self, prediction_id: str, url: str, body: bytes) -> None:
        """Commit the `completed` row, then hand it to the prediction's lane (or a new one)."""
        try:
            async with self._admission:
                delivery = await self.outbox.add_completed(
                    webhook_id=new_webhook_id(),
                    prediction_id=prediction_id,
                    url=url,
                    body=body.decode(),
                    retry_until=time.time() + self._settings.retry_window,
                )
                lane = self._lanes.get(prediction_id)
                if delivery is None:
                    pass  # queued already (by a previous run's recovery)
                elif lane is not None:
                    lane.completed = delivery
                elif self._spill_from is not None:
                    self._spill(delivery)  # older rows wait for room: keep the order
                elif self._open_lane(prediction_id, url, completed=delivery) is None:
                    self._spill(delivery)
        except Exception:
            log.exception("could not queue the completed webhook of %s", prediction_id)
        finally:
            lane = self._lanes.get(prediction_id)
            if lane is not None:
                lane.completing = False
                lane.wakeup.set()

    def _spill(self, delivery: Delivery) -> None:
        if self._closed:
            return  # pending in the outbox; the next start sends it
        if self._spill_from is None or delivery.seq < self._spill_from:
            self._spill_from = delivery.seq
        self._warn_full(
            "webhook backlog is full (%d predictions): the completed webhook of %s waits "
            "in the outbox",
            len(self._lanes),
            delivery.prediction_id,
        )
        self._maybe_refill()

    def _maybe_refill(self) -> None:
        if (
            self._spill_from is None
            or self._closed
            or self._refill_task is not None
            or len(self._lanes) >= self._settings.backlog
        ):
            return
        task = asyncio.create_task(self._refill(), name="webhooks-refill")
        self._refill_task = task

        def done(task: asyncio.Task[None]) -> None:
            self._refill_task = None
            if not task.cancelled() and task.exception() is not None:
                log.error("loading webhooks from the outbox failed", exc_info=task.exception())
            self._update_idle()

        task.add_done_callback(done)

    async def _refill(self) -> None:
        """Give pending outbox rows lanes, oldest first, while the backlog has room."""
        async with self._admission:
            while self._spill_from is not None and not self._closed:
                room = self._settings.backlog - len(self._lanes)
                if room <= 0:
                    return
                rows = await self.outbox.pending(from_seq=self._spill_from, limit=room)
                for delivery in rows:
                    if delivery.prediction_id not in self._lanes:
                        self._open_lane(delivery.prediction_id, delivery.url, completed=delivery)
                self._spill_from = rows[-1].seq + 1 if len(rows) == room else None

    def _update_idle(self) -> None:
        if (
            not self._lanes
            and not self._writes
            and self._refill_task is None
            and self._spill_from is None
        ):
            self._idle.set()
        else:
            self._idle.clear()
