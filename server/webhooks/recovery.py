"""After a restart: `completed` webhooks that the last run owed but never queued."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from server.records import Prediction, utcnow
from server.store import PredictionStore
from server.webhooks.outbox import WebhookOutbox
from server.webhooks.signing import new_webhook_id

log = logging.getLogger(__name__)


async def queue_missed_completions(
    store: PredictionStore,
    outbox: WebhookOutbox,
    render: Callable[[Prediction], bytes],
    *,
    retry_window: float,
) -> int:
    """Write `completed` rows for predictions that ended without one; return how many.

    Those are predictions a crash left running (failed by the store at startup), those
    that ended while the server shut down (after webhooks had stopped listening), and any
    that ended just before a crash, between storing the terminal state and writing the row.
    Only predictions that ended within the retry window count: older ones would have been
    given up on by now.
    """
    since = utcnow() - timedelta(seconds=retry_window)
    finished = await store.finished_with_webhook(since)
    candidates = [p for p in finished if "completed" in p.webhook_events_filter]
    queued = await outbox.with_completed([p.id for p in candidates])
    retry_until = time.time() + retry_window
    added = await asyncio.gather(
        *(
            outbox.add_completed(
                webhook_id=new_webhook_id(),
                prediction_id=p.id,
                url=p.webhook,
                body=render(p).decode(),
                retry_until=retry_until,
            )
            for p in candidates
            if p.webhook is not None and p.id not in queued
        )
    )
    missed = sum(delivery is not None for delivery in added)
    if missed:
        log.warning("queued %d completed webhooks that the last run did not", missed)
    return missed
