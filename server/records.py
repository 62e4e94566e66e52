"""The prediction record and its wire format.

`Prediction` is the one mutable record of a prediction's state. Only `server.predictions`
changes it (through `Prediction.transition`); everything else reads it. `to_wire` renders the
exact object the official clients parse (see the compatibility reference, section 1.3).
"""

from __future__ import annotations

import base64
import enum
import uuid
from datetime import UTC, datetime
from typing import Any

import attrs


class Status(enum.StrEnum):
    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED, Status.CANCELED)


#: The transitions a prediction may make; anything else is a bug in our code.
_ALLOWED: dict[Status, frozenset[Status]] = {
    Status.STARTING: frozenset({Status.PROCESSING, Status.FAILED, Status.CANCELED}),
    Status.PROCESSING: frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED}),
    Status.SUCCEEDED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELED: frozenset(),
}

WEBHOOK_EVENTS = ("start", "output", "logs", "completed")


def new_prediction_id() -> str:
    """26 lowercase base32 characters, as Replicate and Cog make them."""
    return base64.b32encode(uuid.uuid4().bytes).decode("ascii").lower().rstrip("=")


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime | None) -> str | None:
    """ISO-8601 in UTC with microseconds and a `Z`, e.g. `2024-01-02T03:04:05.678901Z`."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@attrs.define(kw_only=True)
class Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    status: Status = Status.STARTING
    output: Any = None
    logs: str = ""
    error: str | None = None
    created_at: datetime = attrs.field(factory=utcnow)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    metrics: dict[str, Any] = attrs.field(factory=dict)
    source: str = "api"
    webhook: str | None = None
    webhook_events_filter: tuple[str, ...] = WEBHOOK_EVENTS
    #: Capability token of the prediction's stream URL; None for models that do not stream.
    stream_token: str | None = None
    deadline: datetime | None = None
    data_removed: bool = False

    def transition(self, new: Status) -> None:
        """Move to `new`, stamping the times; raises on a transition that must never happen."""
        if new not in _ALLOWED[self.status]:
            raise AssertionError(f"prediction {self.id}: {self.status} -> {new} is not allowed")
        now = utcnow()
        if new is Status.PROCESSING:
            self.started_at = now
        if new.terminal:
            self.completed_at = now
            self.metrics["total_time"] = round((now - self.created_at).total_seconds(), 6)
            # A prediction canceled or failed before it started ran for no time.
            ran = (now - self.started_at).total_seconds() if self.started_at else 0.0
            self.metrics.setdefault("predict_time", round(ran, 6))
        self.status = new

    def to_wire(self, base_url: str) -> dict[str, Any]:
        """The prediction object exactly as `GET /v1/predictions/{id}` returns it."""
        urls = {
            "get": f"{base_url}/v1/predictions/{self.id}",
            "cancel": f"{base_url}/v1/predictions/{self.id}/cancel",
            "web": f"{base_url}/predictions/{self.id}",
        }
        if self.stream_token is not None:
            urls["stream"] = f"{base_url}/v1/streams/{self.stream_token}"
        wire: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "logs": self.logs,
            "output": self.output,
            "data_removed": self.data_removed,
            "error": self.error,
            "status": str(self.status),
            "source": self.source,
            "created_at": format_time(self.created_at),
            "started_at": format_time(self.started_at),
            "completed_at": format_time(self.completed_at),
            "urls": urls,
            "metrics": dict(self.metrics),
        }
        if self.deadline is not None:
            wire["deadline"] = format_time(self.deadline)
        if self.webhook is not None:
            wire["webhook"] = self.webhook
            wire["webhook_events_filter"] = list(self.webhook_events_filter)
        return wire
