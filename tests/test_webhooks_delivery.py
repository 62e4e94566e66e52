"""Webhooks end to end: the real app on the tiny model posting to a real receiver.

The conftest settings use a 30 s throttle, so a prediction of the tiny model (a few
milliseconds) gets an exact set of webhooks: `start`, the first update, `completed`.
Tests synchronise on the receiver (`wait_for`), on delivery reports, and on
`WebhookService.wait_idle()`, never on sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.records import WEBHOOK_EVENTS, Prediction, Status, new_prediction_id, parse_time
from server.webhooks import WEBHOOKS, DeliveryReport, WebhookService
from server.webhooks.service import WebhookSettings
from tests.conftest import AUTH, AppStarter
from tests.webhook_receiver import Received, WebhookReceiver

Client = TestClient[web.Request, web.Application]
SMOL = "huggingfacetb/smollm2-135m-instruct"
#: Exactly four tokens, then a `logs` event with the performance metrics.
INPUT = {
    "prompt": "hi",
    "max_tokens": 4,
    "min_tokens": 4,
    "temperature": 0,
    "log_performance_metrics": True,
}


async def secret_of(client: Client) -> str:
    resp = await client.get("/v1/webhooks/default/secret", headers=AUTH)
    assert resp.status == 200
    key = (await resp.json())["key"]
    assert isinstance(key, str)
    return key


async def started(start_app: AppStarter, receiver: WebhookReceiver, **settings: Any) -> Client:
    client = await start_app(**settings)
    receiver.secret = await secret_of(client)
    return client


def webhooks(client: Client) -> WebhookService:
    return client.app[WEBHOOKS]


async def idle(client: Client) -> None:
    """Until every webhook due has been sent (bounded: nothing here should take long)."""
    async with asyncio.timeout(15):
        await webhooks(client).wait_idle()


async def create(
    client: Client, *, path: str = "/v1/predictions", wait: bool = True, **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"input": INPUT, **fields}
    if path == "/v1/predictions":
        body.setdefault("version", SMOL)
    headers = {**AUTH, "Prefer": "wait"} if wait else AUTH
    resp = await client.post(path, json=body, headers=headers)
    assert resp.status == 201, await resp.text()
    data = await resp.json()
    assert isinstance(data, dict)
    return data


def event_of(received: Received) -> str:
    """Which event a body shows (tiny-model predictions: no logs until the metrics line)."""
    body = received.json()
    if body["status"] in ("succeeded", "failed", "canceled"):
        return "completed"
    assert body["status"] == "processing"
    if body["output"] is None and not body["logs"]:
        return "start"
    return "logs" if body["logs"] else "output"


def reports(client: Client) -> asyncio.Queue[DeliveryReport]:
    queue: asyncio.Queue[DeliveryReport] = asyncio.Queue()
    webhooks(client).observers.append(queue.put_nowait)
    return queue


async def final_report(queue: asyncio.Queue[DeliveryReport], prediction_id: str) -> DeliveryReport:
    """The report that ends the `completed` delivery of a prediction (bounded wait)."""
    async with asyncio.timeout(15):
        while True:
            report = await queue.get()
            if report.prediction_id == prediction_id and report.outcome != "retrying":
                return report


FILTERS = [
    None,
    *(
        list(combo)
        for size in range(1, 5)
        for combo in itertools.combinations(WEBHOOK_EVENTS, size)
    ),
]


@pytest.mark.parametrize("events", FILTERS, ids=lambda f: "default" if f is None else "+".join(f))
async def test_each_filter_gets_exactly_its_events(
    start_app: AppStarter, webhook_receiver: WebhookReceiver, events: list[str] | None
) -> None:
    client = await started(start_app, webhook_receiver)
    fields: dict[str, Any] = {"webhook": webhook_receiver.url()}
    if events is not None:
        fields["webhook_events_filter"] = events
    prediction = await create(client, **fields)
    assert prediction["status"] == "succeeded"
    await idle(client)

    wanted = set(WEBHOOK_EVENTS if events is None else events)
    expected = [e for e in ("start",) if e in wanted]
    # Output and logs share one throttle: the first of them goes, the rest wait 30 s and
    # are dropped when the prediction completes.
    if "output" in wanted:
        expected.append("output")
    elif "logs" in wanted:
        expected.append("logs")
    expected += [e for e in ("completed",) if e in wanted]
    received = webhook_receiver.received
    assert [event_of(r) for r in received] == expected
    assert all(r.signature_ok and r.answered == 200 for r in received)
    assert len({r.webhook_id for r in received}) == len(received)
    assert all(r.json()["id"] == prediction["id"] for r in received)
    if "completed" in wanted:
        # Byte for byte what GET answers for the finished prediction.
        get = await client.get(f"/v1/predictions/{prediction['id']}", headers=AUTH)
        assert received[-1].body == await get.read()
    if "output" in wanted:
        update = received[expected.index("output")].json()
        assert update["output"] and not update["logs"]
    elif "logs" in wanted:
        update = received[expected.index("logs")].json()
        assert "output_token_count: 4" in update["logs"]


async def test_every_creation_route_sends_webhooks(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    client = await started(start_app, webhook_receiver)
    only_completed: dict[str, Any] = {"webhook_events_filter": ["completed"]}
    ids = [
        (await create(client, webhook=webhook_receiver.url(route="v"), **only_completed))["id"],
        (
            await create(
                client,
                path=f"/v1/models/{SMOL}/predictions",
                webhook=webhook_receiver.url(route="m"),
                **only_completed,
            )
        )["id"],
        (
            await create(
                client,
                path="/v1/run",
                wait=False,
                model=SMOL,
                webhook=webhook_receiver.url(route="run"),
                **only_completed,
            )
        )["id"],
    ]
    received = await webhook_receiver.wait_for(lambda r: len(r) == 3)
    assert sorted(r.json()["id"] for r in received) == sorted(ids)
    assert all(r.json()["status"] == "succeeded" for r in received)
    assert all(r.signature_ok for r in received)
    # Query parameters on the webhook URL are kept (receivers use them for correlation).
    assert sorted(r.query["route"] for r in received) == ["m", "run", "v"]


async def test_legacy_webhook_completed_gets_only_the_completed_webhook(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    client = await started(start_app, webhook_receiver)
    prediction = await create(client, webhook_completed=webhook_receiver.url())
    assert prediction["webhook_events_filter"] == ["completed"]
    await idle(client)
    assert [event_of(r) for r in webhook_receiver.received] == ["completed"]
    assert webhook_receiver.received[0].json()["output"] == prediction["output"]


def _fake(receiver: WebhookReceiver) -> Prediction:
    prediction = Prediction(
        id=new_prediction_id(),
        model=SMOL,
        version="hidden",
        input={"prompt": "hi"},
        webhook=receiver.url(),
    )
    prediction.transition(Status.PROCESSING)
    return prediction


async def test_throttle_sends_the_latest_state_and_completed_last(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    """Events driven straight into the listener, as PredictionService calls it."""
    throttle = 1.0
    client = await started(start_app, webhook_receiver, webhook_throttle=throttle)
    service = webhooks(client)
    p = _fake(webhook_receiver)
    service.on_prediction_event(p, "start")
    p.output = ["a"]
    service.on_prediction_event(p, "output")  # the throttle is open: goes at once
    for chunk in "bc":
        p.output.append(chunk)
        service.on_prediction_event(p, "output")  # held back
    p.logs += "a log line\n"
    service.on_prediction_event(p, "logs")  # held back too: one throttle for both
    received = await webhook_receiver.wait_for(lambda r: len(r) == 3)
    bodies = [r.json() for r in received]
    assert [b["status"] for b in bodies] == ["processing"] * 3
    assert [b["output"] for b in bodies] == [None, ["a"], ["a", "b", "c"]]
    assert bodies[2]["logs"] == "a log line\n"
    assert received[2].at - received[1].at >= throttle * 0.9

    p.output.append("d")
    service.on_prediction_event(p, "output")  # within the throttle: held back...
    p.transition(Status.SUCCEEDED)
    service.on_prediction_event(p, "completed")  # ...and dropped: completed carries it
    await idle(client)
    bodies = [r.json() for r in webhook_receiver.received]
    assert len(bodies) == 4
    assert bodies[3]["status"] == "succeeded"
    assert bodies[3]["output"] == ["a", "b", "c", "d"]


async def test_fast_stream_is_throttled(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    """A long real stream: few updates, spaced by the throttle, growing, completed last."""
    throttle = 0.05
    client = await started(start_app, webhook_receiver, webhook_throttle=throttle)
    inputs = {**INPUT, "max_tokens": 300, "min_tokens": 300}
    prediction = await create(client, input=inputs, webhook=webhook_receiver.url())
    await idle(client)
    received = webhook_receiver.received
    events = [event_of(r) for r in received]
    assert events[0] == "start" and events[-1] == "completed"
    assert "completed" not in events[:-1]
    updates = received[1:-1]
    assert updates, "at least the first output goes out"
    started_at, completed_at = (parse_time(prediction[k]) for k in ("started_at", "completed_at"))
    assert started_at is not None and completed_at is not None
    processing = completed_at - started_at
    # At most one update per throttle interval while the prediction was processing.
    allowed = int(processing.total_seconds() / throttle) + 1
    assert len(updates) <= allowed, (len(updates), allowed)
    assert all(b.at - a.at >= throttle / 2 for a, b in itertools.pairwise(updates))
    lengths = [len(r.json()["output"] or []) for r in updates]
    assert lengths == sorted(lengths)
    assert len(received[-1].json()["output"]) >= lengths[-1]


async def test_completed_is_retried_until_it_succeeds(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    client = await started(start_app, webhook_receiver)
    queue = reports(client)
    webhook_receiver.fail(2, status=503)
    webhook_receiver.fail(1, status=429)
    prediction = await create(
        client, webhook=webhook_receiver.url(), webhook_events_filter=["completed"]
    )
    final = await final_report(queue, prediction["id"])
    assert final.outcome == "delivered" and final.attempt == 4
    received = webhook_receiver.received
    assert [r.answered for r in received] == [503, 503, 429, 200]
    assert len({r.webhook_id for r in received}) == 1  # one delivery, retried
    assert len({r.body for r in received}) == 1
    assert all(r.signature_ok for r in received)
    listing = await (
        await client.get(
            "/v1/webhooks/deliveries",
            params={"prediction_id": prediction["id"]},
            headers=AUTH,
        )
    ).json()
    [row] = listing["results"]
    assert row["status"] == "delivered" and row["attempts"] == 4
    assert row["id"] == received[0].webhook_id
    attempts = await webhooks(client).outbox.attempts(row["id"])
    assert [a.status_code for a in attempts] == [503, 503, 429, 200]
    # /metrics counts every attempt by outcome.
    scraped = await (await client.get("/metrics", headers=AUTH)).text()
    for outcome, count in (("http_5xx", 2), ("http_4xx", 1), ("delivered", 1)):
        assert f'replicant_webhook_attempts_total{{outcome="{outcome}"}} {count}.0' in scraped


async def test_retry_after_is_honoured(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    client = await started(start_app, webhook_receiver)
    queue = reports(client)
    webhook_receiver.fail(1, status=429, headers={"Retry-After": "1"})
    prediction = await create(
        client, webhook=webhook_receiver.url(), webhook_events_filter=["completed"]
    )
    assert (await final_report(queue, prediction["id"])).outcome == "delivered"
    first, second = webhook_receiver.received
    # Without the header the retry would come after about 0.05 s.
    assert second.at - first.at >= 0.95


async def test_a_timeout_is_retried_with_the_same_id(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    client = await started(start_app, webhook_receiver, webhook_timeout=0.5)
    queue = reports(client)
    webhook_receiver.hang(1)
    prediction = await create(
        client, webhook=webhook_receiver.url(), webhook_events_filter=["completed"]
    )
    first = await queue.get()
    assert first.outcome == "retrying"
    assert first.result.error is not None and "no answer within 0.5 s" in first.result.error
    webhook_receiver.release()
    assert (await final_report(queue, prediction["id"])).outcome == "delivered"
    assert len({r.webhook_id for r in webhook_receiver.received}) == 1


async def test_gives_up_after_the_retry_window_and_says_so(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    window = 1.0
    client = await started(
        start_app, webhook_receiver, webhook_retry_window=window, webhook_retry_delay=0.1
    )
    queue = reports(client)
    webhook_receiver.fail(100, status=500)
    prediction = await create(
        client, webhook=webhook_receiver.url(), webhook_events_filter=["completed"]
    )
    final = await final_report(queue, prediction["id"])
    assert final.outcome == "failed"
    received = webhook_receiver.received
    assert 2 <= len(received) == final.attempt
    assert received[-1].at - received[0].at <= window
    assert len({r.webhook_id for r in received}) == 1

    got = await (await client.get(f"/v1/predictions/{prediction['id']}", headers=AUTH)).json()
    note = f"Webhook delivery to {webhook_receiver.url()} failed after {final.attempt} attempts"
    assert note in got["logs"]
    assert "HTTP 500" in got["logs"]
    failed = await (await client.get("/v1/webhooks/deliveries?status=failed", headers=AUTH)).json()
    [row] = failed["results"]
    assert row["prediction_id"] == prediction["id"] and row["status"] == "failed"
    assert row["last_status_code"] == 500 and row["attempts"] == final.attempt
    assert (
        await client.get("/v1/webhooks/deliveries?status=failed")
    ).status == 401  # operators only
    assert (await client.get("/v1/webhooks/deliveries?status=lost", headers=AUTH)).status == 422


@pytest.mark.parametrize("kind", ["400", "redirect"])
async def test_other_answers_are_final(
    start_app: AppStarter, webhook_receiver: WebhookReceiver, kind: str
) -> None:
    client = await started(start_app, webhook_receiver)
    queue = reports(client)
    if kind == "redirect":
        webhook_receiver.redirect(1, location=webhook_receiver.url("/elsewhere"))
    else:
        webhook_receiver.fail(1, status=400)
    prediction = await create(
        client, webhook=webhook_receiver.url(), webhook_events_filter=["completed"]
    )
    final = await final_report(queue, prediction["id"])
    assert final.outcome == "failed" and final.attempt == 1
    await idle(client)
    # A redirect is not followed: nothing reached /elsewhere.
    assert [r.path for r in webhook_receiver.received] == ["/hook"]
    got = await (await client.get(f"/v1/predictions/{prediction['id']}", headers=AUTH)).json()
    assert "failed after 1 attempt:" in got["logs"]
    assert ("not followed" if kind == "redirect" else "HTTP 400") in got["logs"]


async def test_intermediate_webhooks_are_sent_once_and_failures_recorded(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    client = await started(start_app, webhook_receiver)
    webhook_receiver.fail(1, status=500)  # the start webhook
    prediction = await create(client, webhook=webhook_receiver.url())
    await idle(client)
    assert [(event_of(r), r.answered) for r in webhook_receiver.received] == [
        ("start", 500),
        ("output", 200),
        ("completed", 200),
    ]
    failed = await (await client.get("/v1/webhooks/deliveries?status=failed", headers=AUTH)).json()
    [row] = failed["results"]
    assert row["event"] == "start" and row["prediction_id"] == prediction["id"]
    assert row["id"] == webhook_receiver.received[0].webhook_id


async def test_link_local_addresses_are_refused(start_app: AppStarter) -> None:
    client = await start_app()
    queue = reports(client)
    prediction = await create(
        client,
        webhook="http://169.254.169.254/latest/meta-data/",
        webhook_events_filter=["completed"],
    )
    final = await final_report(queue, prediction["id"])
    assert final.outcome == "failed" and final.attempt == 1
    assert final.result.error is not None and "link-local" in final.result.error


async def test_a_hung_receiver_delays_only_its_own_webhooks(
    start_app: AppStarter,
    webhook_receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    healthy = webhook_receiver
    hung = WebhookReceiver()
    await hung.start()
    try:
        client = await started(
            start_app, healthy, webhook_host_concurrency=1, webhook_concurrency=2
        )
        hung.hang(100)
        only_completed: dict[str, Any] = {"webhook_events_filter": ["completed"]}
        stuck = [await create(client, webhook=hung.url(), **only_completed) for _ in range(3)]
        # Generation is not held up: each finished while its webhook hangs.
        assert all(p["status"] == "succeeded" for p in stuck)
        await hung.wait_for(lambda r: len(r) == 1)
        fine = await create(client, webhook=healthy.url(), **only_completed)
        received = await healthy.wait_for(lambda r: len(r) == 1)
        assert received[0].json()["id"] == fine["id"]
        assert len(hung.received) == 1  # one request slot for that host, still taken
        health = await client.get("/health-check")
        assert health.status == 200
        assert any("more wait for them" in r.getMessage() for r in caplog.records)
        hung.release()
        await idle(client)
        assert sorted(r.json()["id"] for r in hung.received) == sorted(p["id"] for p in stuck)
    finally:
        await hung.stop()


async def test_a_full_backlog_keeps_completed_webhooks_in_the_outbox(
    start_app: AppStarter,
    webhook_receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="server.webhooks")
    client = await started(start_app, webhook_receiver, webhook_backlog=1)
    webhook_receiver.hang(1)
    first = await create(client, webhook=webhook_receiver.url())
    await webhook_receiver.wait_for(lambda r: len(r) == 1)  # its start webhook, hanging
    second = await create(client, webhook=webhook_receiver.url())
    assert any("backlog is full" in r.getMessage() for r in caplog.records)
    webhook_receiver.release()
    await idle(client)
    events = [(r.json()["id"], event_of(r)) for r in webhook_receiver.received]
    # The first prediction's webhooks all went; the second's intermediate ones were dropped
    # while the backlog was full, and its completed one waited in the outbox.
    assert events == [
        (first["id"], "start"),
        (first["id"], "output"),
        (first["id"], "completed"),
        (second["id"], "completed"),
    ]


async def test_finished_deliveries_are_pruned_after_their_retention(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    client = await started(start_app, webhook_receiver)
    queue = reports(client)
    delivered = await create(
        client, webhook=webhook_receiver.url(), webhook_events_filter=["completed"]
    )
    assert (await final_report(queue, delivered["id"])).outcome == "delivered"
    # The next receiver blips for a long time: its completed delivery stays pending.
    webhook_receiver.fail(1000, status=503)
    pending = await create(
        client, webhook=webhook_receiver.url(), webhook_events_filter=["completed"]
    )
    async with asyncio.timeout(15):
        while (await queue.get()).prediction_id != pending["id"]:
            pass

    async def listed() -> dict[str, dict[str, Any]]:
        resp = await client.get("/v1/webhooks/deliveries", headers=AUTH)
        return {row["prediction_id"]: row for row in (await resp.json())["results"]}

    rows = await listed()
    assert {k: r["status"] for k, r in rows.items()} == {
        delivered["id"]: "delivered",
        pending["id"]: "pending",
    }
    service = webhooks(client)
    # Within the retention (a week by default) nothing is removed.
    assert await service.prune() == 0
    assert len(await listed()) == 2
    # Past it, the finished delivery and its attempts go; the pending one stays.
    assert await service.outbox.prune(finished_before=time.time() + 1) == 1
    assert list(await listed()) == [pending["id"]]
    assert await service.outbox.attempts(rows[delivered["id"]]["id"]) == []
    assert len(await service.outbox.attempts(rows[pending["id"]]["id"])) >= 1


def test_retention_is_never_shorter_than_twice_the_retry_window() -> None:
    settings = WebhookSettings(retention=60, retry_window=300)
    assert settings.kept_for == 600
    assert WebhookSettings().kept_for == 7 * 24 * 3600
