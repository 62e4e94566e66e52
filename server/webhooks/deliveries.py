"""What the outbox records: deliveries, their states, and the attempts made at them."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import attrs

from server.records import format_time


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@attrs.frozen(kw_only=True)
class Attempt:
    """What one POST to a receiver came to."""

    started_at: float
    duration: float
    status_code: int | None = None
    error: str | None = None
    #: Seconds the receiver asked us to wait (`Retry-After`), if it did.
    retry_after: float | None = None
    #: Sending again cannot help (a forbidden address, an invalid URL).
    permanent: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def describe(self) -> str:
        if self.status_code is not None:
            detail = f": {self.error}" if self.error else ""
            return f"HTTP {self.status_code}{detail}"
        return self.error or "no answer"


@attrs.define(kw_only=True)
class Delivery:
    """One row of `webhook_deliveries`; lanes update their copy as attempts go."""

    seq: int
    id: str
    prediction_id: str
    event: str
    url: str
    body: str
    status: DeliveryStatus
    attempts: int
    created_at: float
    next_attempt_at: float
    retry_until: float
    last_attempt_at: float | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """What the operator route shows (no body: it can be large and holds the input)."""
        return {
            "id": self.id,
            "prediction_id": self.prediction_id,
            "event": self.event,
            "url": self.url,
            "status": str(self.status),
            "attempts": self.attempts,
            "created_at": _iso(self.created_at),
            "last_attempt_at": _iso(self.last_attempt_at),
            "next_attempt_at": (
                _iso(self.next_attempt_at) if self.status is DeliveryStatus.PENDING else None
            ),
            "retry_until": _iso(self.retry_until),
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
            "finished_at": _iso(self.finished_at),
        }


def _iso(value: float | None) -> str | None:
    return None if value is None else format_time(datetime.fromtimestamp(value, UTC))
