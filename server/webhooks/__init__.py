"""Webhooks: signed, throttled, and (for `completed`) durable and retried across restarts.

- `service`: the listener on prediction events, and one delivery lane per prediction.
- `lanes`: a lane's state, and the request slots lanes share.
- `sender`: one signed HTTP attempt, what its answer means, the backoff.
- `signing`: the Standard Webhooks signature and the `whsec_` secret in the data dir.
- `outbox`, `deliveries`: the SQLite tables that make `completed` deliveries durable.
- `recovery`: `completed` webhooks a previous run owed, queued at startup.
- `guard`: the addresses webhooks may never reach (link-local, cloud metadata).

`webhooks_ctx` is the `cleanup_ctx` that opens all of it; it runs after the prediction
service exists, and subscribes to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from server import keys
from server.config import Config
from server.webhooks.deliveries import Attempt, Delivery, DeliveryStatus
from server.webhooks.outbox import WebhookOutbox
from server.webhooks.sender import WebhookSender, new_session
from server.webhooks.service import DeliveryReport, WebhookService, WebhookSettings
from server.webhooks.signing import WebhookSigner

__all__ = [
    "SIGNER",
    "WEBHOOKS",
    "Attempt",
    "Delivery",
    "DeliveryReport",
    "DeliveryStatus",
    "WebhookOutbox",
    "WebhookService",
    "WebhookSettings",
    "WebhookSigner",
    "webhooks_ctx",
]

# Declared here rather than in server.keys, which does not import this package.
WEBHOOKS = web.AppKey("webhooks", WebhookService)
SIGNER = web.AppKey("webhook_signer", WebhookSigner)


def settings_from(config: Config) -> WebhookSettings:
    return WebhookSettings(
        throttle=config.webhook_throttle,
        retry_window=config.webhook_retry_window,
        retry_delay=config.webhook_retry_delay,
        concurrency=config.webhook_concurrency,
        host_concurrency=config.webhook_host_concurrency,
        backlog=config.webhook_backlog,
        retention=config.webhook_retention,
    )


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the outbox and the client session, resume pending deliveries, subscribe."""
    config = app[keys.CONFIG]
    signer = WebhookSigner.load_or_create(config.data_dir)
    outbox = await WebhookOutbox.open(config.database_path)
    session = new_session(
        timeout=config.webhook_timeout,
        concurrency=config.webhook_concurrency,
        deny_private=config.webhook_deny_private,
    )
    sender = WebhookSender(
        session, signer, timeout=config.webhook_timeout, deny_private=config.webhook_deny_private
    )
    service = WebhookService(
        outbox,
        sender,
        app[keys.STORE],
        base_url=(config.public_url or config.listen_url).rstrip("/"),
        settings=settings_from(config),
    )
    predictions = app[keys.PREDICTIONS]
    try:
        await service.start()
        predictions.listeners.append(service.on_prediction_event)
        app[WEBHOOKS] = service
        app[SIGNER] = signer
        yield
    finally:
        if service.on_prediction_event in predictions.listeners:
            predictions.listeners.remove(service.on_prediction_event)
        await service.close()
        await session.close()
        await outbox.close()
