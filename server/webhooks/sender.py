"""Posting one webhook: the signed request, what its answer means, and when to retry.

Redirects are not followed (as on Replicate): a receiver that answers 3xx has a wrong URL,
and following it could lead anywhere. A request that gets no answer in time, a connection
error, 429 and 5xx may be retried; any other answer is final.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp.resolver import DefaultResolver

from server import __version__
from server.webhooks.deliveries import Attempt, Delivery, DeliveryStatus
from server.webhooks.guard import AddressForbidden, GuardedResolver, check_literal
from server.webhooks.signing import WebhookSigner

USER_AGENT = f"replicant/{__version__} (webhooks)"
#: Longest wait between two retries, however many there were.
MAX_RETRY_DELAY = 60.0
#: How much of a failed answer's body is kept for the operator.
_ERROR_SNIPPET = 200


def can_retry(attempt: Attempt) -> bool:
    """Whether sending the same delivery again could succeed."""
    if attempt.succeeded or attempt.permanent:
        return False
    code = attempt.status_code
    return code is None or code == 429 or code >= 500


def retry_delay(retries_done: int, first: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: between half and all of `first`·2^n, capped."""
    ceiling = min(MAX_RETRY_DELAY, first * 2**retries_done)
    return rng.uniform(ceiling / 2, ceiling)


def settle(
    delivery: Delivery, attempt: Attempt, *, first_retry: float, rng: random.Random, now: float
) -> None:
    """Apply an attempt to a `completed` delivery: delivered, retried later, or failed.

    A retry is scheduled after the backoff, or the receiver's `Retry-After` if that is
    longer, and only if it would start before `retry_until`.
    """
    delivery.attempts += 1
    delivery.last_attempt_at = attempt.started_at
    delivery.last_status_code = attempt.status_code
    delivery.last_error = None if attempt.succeeded else attempt.describe()
    if attempt.succeeded:
        delivery.status = DeliveryStatus.DELIVERED
    elif can_retry(attempt):
        backoff = retry_delay(delivery.attempts - 1, first_retry, rng)
        next_at = now + max(backoff, attempt.retry_after or 0.0)
        if next_at <= delivery.retry_until:
            delivery.next_attempt_at = next_at
        else:
            delivery.status = DeliveryStatus.FAILED
    else:
        delivery.status = DeliveryStatus.FAILED
    if delivery.status is not DeliveryStatus.PENDING:
        delivery.finished_at = now


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds a `Retry-After` header asks for (a number or an HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.fromtimestamp(now, UTC)).total_seconds())


def new_session(*, timeout: float, concurrency: int, deny_private: bool) -> aiohttp.ClientSession:
    """The client session webhooks go out on: guarded DNS, a total timeout, no env proxies."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(DefaultResolver(), deny_private=deny_private),
        limit=concurrency,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers={"User-Agent": USER_AGENT},
        trust_env=False,
    )


class WebhookSender:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        signer: WebhookSigner,
        *,
        timeout: float,
        deny_private: bool,
    ) -> None:
        self._session = session
        self._signer = signer
        self._timeout = timeout
        self._deny_private = deny_private

    async def post(self, url: str, webhook_id: str, body: bytes) -> Attempt:
        """Send one signed attempt; every outcome, including errors, comes back as an Attempt."""
        started = time.time()
        clock = asyncio.get_running_loop().time
        t0 = clock()

        def attempt(
            status_code: int | None = None,
            error: str | None = None,
            retry_after: float | None = None,
            permanent: bool = False,
        ) -> Attempt:
            return Attempt(
                started_at=started,
                duration=round(clock() - t0, 6),
                status_code=status_code,
                error=error,
                retry_after=retry_after,
                permanent=permanent,
            )

        headers = {"Content-Type": "application/json", **self._signer.headers(webhook_id, body)}
        try:
            check_literal(urlsplit(url).hostname or "", deny_private=self._deny_private)
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return attempt(status_code=resp.status)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                error: str | None
                if 300 <= resp.status < 400:
                    location = resp.headers.get("Location", "nowhere")
                    error = f"redirect to {location} not followed"
                else:
                    snippet = await resp.content.read(_ERROR_SNIPPET)
                    error = snippet.decode("utf-8", "replace").strip() or None
                return attempt(status_code=resp.status, error=error, retry_after=retry_after)
        except AddressForbidden as exc:
            return attempt(error=str(exc), permanent=True)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressForbidden):
                return attempt(error=str(exc.os_error), permanent=True)
            return attempt(error=f"cannot connect: {exc.os_error or exc}")
        except aiohttp.InvalidURL as exc:
            return attempt(error=f"invalid URL: {exc}", permanent=True)
        except TimeoutError:
            return attempt(error=f"no answer within {self._timeout:g} s")
        except aiohttp.ClientError as exc:
            return attempt(error=f"{type(exc).__name__}: {exc}")
