"""`completed` webhooks survive restarts: stop the app, start a new one on the same data dir."""

from __future__ import annotations

import asyncio

from server import keys
from server.app import RESTART_ERROR
from server.records import Prediction, Status, new_prediction_id
from server.store import PredictionStore
from server.webhooks import WEBHOOKS, DeliveryReport
from tests.conftest import AUTH, AppStarter
from tests.test_webhooks_delivery import SMOL, create, event_of, final_report, idle, reports
from tests.webhook_receiver import WebhookReceiver


async def test_pending_delivery_is_sent_after_a_restart(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    url = webhook_receiver.url()
    await webhook_receiver.stop()  # the receiver is down: connections are refused
    first = await start_app(webhook_retry_delay=0.5, webhook_retry_window=60)
    failed_attempt: asyncio.Future[DeliveryReport] = asyncio.get_running_loop().create_future()

    def observe(report: DeliveryReport) -> None:
        if not failed_attempt.done():
            failed_attempt.set_result(report)

    first.app[WEBHOOKS].observers.append(observe)
    prediction = await create(first, webhook=url, webhook_events_filter=["completed"])
    async with asyncio.timeout(15):
        report = await failed_attempt
    assert report.outcome == "retrying"
    assert report.result.error is not None and "cannot connect" in report.result.error
    await first.close()  # shut down with the delivery pending

    await webhook_receiver.start()  # back up, on the same port
    second = await start_app()
    queue = reports(second)
    final = await final_report(queue, prediction["id"])
    assert final.outcome == "delivered"
    assert final.webhook_id == report.webhook_id  # the same delivery, retried
    assert final.attempt == 2
    [received] = webhook_receiver.received
    assert received.webhook_id == report.webhook_id
    assert received.json()["id"] == prediction["id"]
    assert received.json()["output"] == prediction["output"]
    pending = await (
        await second.get("/v1/webhooks/deliveries?status=pending", headers=AUTH)
    ).json()
    assert pending["results"] == []
    await idle(second)
    assert len(webhook_receiver.received) == 1  # not sent twice


async def test_prediction_cut_off_by_a_crash_gets_its_completed_webhook(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    # First start makes the data dir; then, as if a process had died mid-generation, a
    # running prediction is left in the database with nothing in the outbox.
    first = await start_app()
    database = first.app[keys.CONFIG].database_path
    await first.close()
    store = await PredictionStore.open(database)
    interrupted = Prediction(
        id=new_prediction_id(),
        model=SMOL,
        version="hidden",
        input={"prompt": "hi"},
        webhook=webhook_receiver.url(),
    )
    interrupted.transition(Status.PROCESSING)
    interrupted.output = ["partial"]
    await store.insert(interrupted)
    await store.close()

    second = await start_app()
    received = await webhook_receiver.wait_for(lambda r: len(r) == 1)
    body = received[0].json()
    assert event_of(received[0]) == "completed"
    assert body["id"] == interrupted.id
    assert body["status"] == "failed" and body["error"] == RESTART_ERROR
    assert body["output"] == ["partial"]
    await idle(second)
    await second.close()

    # Another restart queues nothing again: the delivery is recorded.
    third = await start_app()
    await idle(third)
    assert len(webhook_receiver.received) == 1
