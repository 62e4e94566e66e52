"""Webhook policy in isolation: where webhooks may go, and when a delivery is retried."""

from __future__ import annotations

import ipaddress
import random
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from server.webhooks.deliveries import Attempt, Delivery, DeliveryStatus
from server.webhooks.guard import AddressForbidden, GuardedResolver, check_literal
from server.webhooks.sender import (
    MAX_RETRY_DELAY,
    can_retry,
    parse_retry_after,
    retry_delay,
    settle,
)
from tests.conftest import AppStarter
from tests.test_webhooks_delivery import create, final_report, reports
from tests.webhook_receiver import WebhookReceiver


class StubResolver(AbstractResolver):
    """Answers every name with fixed addresses, as a DNS server controlled by an attacker."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "[fe80::1]",
        "[fd00:ec2::254]",
        "100.100.100.200",
        "[::ffff:169.254.169.254]",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
def test_forbidden_literals(host: str) -> None:
    with pytest.raises(AddressForbidden):
        check_literal(host, deny_private=False)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "10.1.2.3", "192.168.0.10", "8.8.8.8"])
def test_loopback_and_private_are_allowed_unless_denied(host: str) -> None:
    check_literal(host, deny_private=False)
    address = ipaddress.ip_address(host.strip("[]"))
    if address.is_private:
        with pytest.raises(AddressForbidden):
            check_literal(host, deny_private=True)


async def test_names_resolving_to_forbidden_addresses_are_refused() -> None:
    resolver = GuardedResolver(StubResolver("169.254.169.254"), deny_private=False)
    with pytest.raises(AddressForbidden, match="link-local"):
        await resolver.resolve("metadata.example", 80)
    # Only the allowed addresses of a mixed answer are kept.
    mixed = GuardedResolver(StubResolver("169.254.169.254", "127.0.0.1"), deny_private=False)
    assert [r["host"] for r in await mixed.resolve("mixed.example", 80)] == ["127.0.0.1"]
    private = GuardedResolver(StubResolver("127.0.0.1"), deny_private=True)
    with pytest.raises(AddressForbidden, match="private"):
        await private.resolve("localhost", 80)


async def test_private_receivers_are_refused_when_configured(
    start_app: AppStarter, webhook_receiver: WebhookReceiver
) -> None:
    client = await start_app(webhook_deny_private=True)
    queue = reports(client)
    for url in (webhook_receiver.url(), f"http://localhost:{webhook_receiver.port}/hook"):
        prediction = await create(client, webhook=url, webhook_events_filter=["completed"])
        final = await final_report(queue, prediction["id"])
        assert final.outcome == "failed" and final.attempt == 1
        assert final.result.error is not None and "private" in final.result.error
    assert webhook_receiver.received == []


def _attempt(
    status: int | None = None,
    *,
    error: str | None = None,
    retry_after: float | None = None,
    permanent: bool = False,
) -> Attempt:
    return Attempt(
        started_at=1000.0,
        duration=0.1,
        status_code=status,
        error=error,
        retry_after=retry_after,
        permanent=permanent,
    )


@pytest.mark.parametrize(
    ("attempt", "retried"),
    [
        (_attempt(200), False),
        (_attempt(None, error="cannot connect"), True),
        (_attempt(None, error="no answer within 10 s"), True),
        (_attempt(429), True),
        (_attempt(500), True),
        (_attempt(503), True),
        (_attempt(400), False),
        (_attempt(404), False),
        (_attempt(410), False),
        (_attempt(307, error="redirect to /x not followed"), False),
        (_attempt(None, error="forbidden", permanent=True), False),
    ],
)
def test_what_is_retried(attempt: Attempt, retried: bool) -> None:
    assert can_retry(attempt) is retried


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    for n in range(12):
        ceiling = min(MAX_RETRY_DELAY, 1.0 * 2**n)
        delays = [retry_delay(n, 1.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_retry_after_in_seconds_or_as_a_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120", now.timestamp()) == 120
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now.timestamp()) == 30
    assert parse_retry_after("soon", now.timestamp()) is None
    assert parse_retry_after(None, now.timestamp()) is None


def _delivery(retry_until: float) -> Delivery:
    return Delivery(
        seq=1,
        id="msg_x",
        prediction_id="p",
        event="completed",
        url="http://127.0.0.1/hook",
        body="{}",
        status=DeliveryStatus.PENDING,
        attempts=0,
        created_at=1000.0,
        next_attempt_at=1000.0,
        retry_until=retry_until,
    )


def _state(d: Delivery) -> tuple[DeliveryStatus, int, float | None, str | None]:
    return d.status, d.attempts, d.finished_at, d.last_error


def test_settle_schedules_retries_within_the_window_only() -> None:
    rng = random.Random(1)
    d = _delivery(retry_until=1010.0)
    settle(d, _attempt(500, error="oops"), first_retry=1.0, rng=rng, now=1000.0)
    assert _state(d) == (DeliveryStatus.PENDING, 1, None, "HTTP 500: oops")
    assert 1000.5 <= d.next_attempt_at <= 1001.0
    # Retry-After past the window: no retry can honour it, so the delivery fails now.
    settle(d, _attempt(429, retry_after=60.0), first_retry=1.0, rng=rng, now=1001.0)
    assert _state(d) == (DeliveryStatus.FAILED, 2, 1001.0, "HTTP 429")
    d = _delivery(retry_until=1010.0)
    settle(d, _attempt(204), first_retry=1.0, rng=rng, now=1000.0)
    assert _state(d) == (DeliveryStatus.DELIVERED, 1, 1000.0, None)
