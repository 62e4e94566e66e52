"""WebhookOutbox: webhook deliveries in SQLite, so `completed` webhooks survive restarts.

A `completed` delivery is one row, written (and committed) when the prediction ends and
updated in place after every attempt until it is `delivered` or `failed`; each attempt is also
a row of `webhook_attempts`. Intermediate webhooks (start, output, logs) are sent once from
memory and get a row only when that one attempt failed, for the operator to see.

The outbox has its own connection to the database file (WAL), with `synchronous=FULL`: a
`completed` row is on disk before anything is sent. Writes are group-committed: whatever
lanes ask to write while one transaction commits goes into the next one, so a burst of
completions costs a few transactions, not one each. The tables come from migration 2 in
`server.store`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import attrs

from server.webhooks.deliveries import Attempt, Delivery, DeliveryStatus

_COLUMNS = (
    "seq, id, prediction_id, event, url, body, status, attempts, created_at, next_attempt_at, "
    "retry_until, last_attempt_at, last_status_code, last_error, finished_at"
)


def _delivery(row: Sequence[Any]) -> Delivery:
    return Delivery(
        seq=row[0],
        id=row[1],
        prediction_id=row[2],
        event=row[3],
        url=row[4],
        body=row[5],
        status=DeliveryStatus(row[6]),
        attempts=row[7],
        created_at=row[8],
        next_attempt_at=row[9],
        retry_until=row[10],
        last_attempt_at=row[11],
        last_status_code=row[12],
        last_error=row[13],
        finished_at=row[14],
    )


@attrs.frozen
class _NewCompleted:
    id: str
    prediction_id: str
    url: str
    body: str
    created_at: float
    retry_until: float


@attrs.frozen
class _FailedOnce:
    id: str
    prediction_id: str
    event: str
    url: str
    attempt: Attempt


@attrs.frozen
class _AttemptMade:
    delivery: Delivery  # a snapshot, taken when the write was asked for
    attempt: Attempt


_Write = _NewCompleted | _FailedOnce | _AttemptMade


async def _execute_many(db: aiosqlite.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    # The cursor is closed on aiosqlite's thread (see PredictionStore.insert for why).
    if rows:
        async with db.executemany(sql, rows):
            pass


class WebhookOutbox:
    """Async access to the outbox tables. Open with `WebhookOutbox.open(path)`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        # Many lanes share this connection: one transaction or read runs at a time, or one
        # coroutine's commit could end another's half-done transaction.
        self._lock = asyncio.Lock()
        self._queued: list[tuple[_Write, asyncio.Future[Delivery | None]]] = []
        self._committer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path) -> WebhookOutbox:
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=5000")
        return cls(db)

    async def close(self) -> None:
        """Finish the writes asked for so far, then close the connection."""
        while self._committer is not None:
            await asyncio.shield(self._committer)
        async with self._lock:
            await self._db.close()

    # -- writes (group-committed) -----------------------------------------------------------

    async def add_completed(
        self, *, webhook_id: str, prediction_id: str, url: str, body: str, retry_until: float
    ) -> Delivery | None:
        """Store a pending `completed` delivery; None if the prediction already has one."""
        return await self._write(
            _NewCompleted(webhook_id, prediction_id, url, body, time.time(), retry_until)
        )

    async def record_attempt(self, delivery: Delivery, attempt: Attempt) -> None:
        """Write an attempt and the delivery's new state (as the caller set it) together."""
        await self._write(_AttemptMade(attrs.evolve(delivery), attempt))

    async def add_failed_once(
        self, *, webhook_id: str, prediction_id: str, event: str, url: str, attempt: Attempt
    ) -> None:
        """Record an intermediate webhook whose only attempt failed."""
        await self._write(_FailedOnce(webhook_id, prediction_id, event, url, attempt))

    async def _write(self, write: _Write) -> Delivery | None:
        future: asyncio.Future[Delivery | None] = asyncio.get_running_loop().create_future()
        self._queued.append((write, future))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_queued(), name="webhook-outbox")
        # A caller cancelled here still has its write committed, like any sent request.
        return await asyncio.shield(future)

    async def _commit_queued(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                try:
                    async with self._lock:
                        results = await self._commit(batch)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._committer = None

    async def _commit(
        self, batch: list[tuple[_Write, asyncio.Future[Delivery | None]]]
    ) -> list[Delivery | None]:
        """One transaction for a whole batch of writes."""
        writes = [write for write, _ in batch]
        new = [w for w in writes if isinstance(w, _NewCompleted)]
        failed = [w for w in writes if isinstance(w, _FailedOnce)]
        made = [w for w in writes if isinstance(w, _AttemptMade)]
        db = self._db
        try:
            await _execute_many(
                db,
                "INSERT OR IGNORE INTO webhook_deliveries (id, prediction_id, event, url, body, "
                "status, attempts, created_at, next_attempt_at, retry_until) "
                "VALUES (?, ?, 'completed', ?, ?, 'pending', 0, ?, ?, ?)",
                [
                    (
                        w.id,
                        w.prediction_id,
                        w.url,
                        w.body,
                        w.created_at,
                        w.created_at,
                        w.retry_until,
                    )
                    for w in new
                ],
            )
            await _execute_many(
                db,
                "INSERT INTO webhook_deliveries (id, prediction_id, event, url, body, status, "
                "attempts, created_at, next_attempt_at, retry_until, last_attempt_at, "
                "last_status_code, last_error, finished_at) "
                "VALUES (?, ?, ?, ?, '', 'failed', 1, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        *(w.id, w.prediction_id, w.event, w.url),
                        *(w.attempt.started_at,) * 4,
                        *(w.attempt.status_code, w.attempt.error),
                        w.attempt.started_at + w.attempt.duration,
                    )
                    for w in failed
                ],
            )
            attempts = [(w.delivery.id, w.delivery.attempts, w.attempt) for w in made]
            attempts += [(w.id, 1, w.attempt) for w in failed]
            await _execute_many(
                db,
                "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration, "
                "status_code, error) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (delivery_id, n, a.started_at, a.duration, a.status_code, a.error)
                    for delivery_id, n, a in attempts
                ],
            )
            await _execute_many(
                db,
                "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_at = ?, "
                "last_attempt_at = ?, last_status_code = ?, last_error = ?, finished_at = ? "
                "WHERE id = ?",
                [
                    (
                        str(w.delivery.status),
                        w.delivery.attempts,
                        w.delivery.next_attempt_at,
                        w.delivery.last_attempt_at,
                        w.delivery.last_status_code,
                        w.delivery.last_error,
                        w.delivery.finished_at,
                        w.delivery.id,
                    )
                    for w in made
                ],
            )
            created = await self._by_ids([w.id for w in new]) if new else {}
            await db.commit()
        except BaseException:
            # Never leave a transaction open: it would hold the database's write lock.
            await db.rollback()
            raise
        return [created.get(w.id) if isinstance(w, _NewCompleted) else None for w in writes]

    async def _by_ids(self, ids: Sequence[str]) -> dict[str, Delivery]:
        found: dict[str, Delivery] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = await self._db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM webhook_deliveries "
                f"WHERE id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            found.update((row[1], _delivery(row)) for row in rows)
        return found

    async def prune(self, *, finished_before: float) -> int:
        """Delete delivered and failed deliveries that finished before this unix time, with
        their attempts; pending ones are never deleted. Returns how many were deleted."""
        finished = "status != 'pending' AND finished_at < ?"
        async with self._lock:
            db = self._db
            try:
                async with db.execute(
                    "DELETE FROM webhook_attempts WHERE delivery_id IN "
                    f"(SELECT id FROM webhook_deliveries WHERE {finished})",
                    (finished_before,),
                ):
                    pass
                async with db.execute(
                    f"DELETE FROM webhook_deliveries WHERE {finished}", (finished_before,)
                ) as cursor:
                    removed = cursor.rowcount
            except BaseException:
                await db.rollback()
                raise
            await db.commit()
        return max(removed, 0)

    # -- reads ------------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[aiosqlite.Row]:
        async with self._lock:
            return list(await self._db.execute_fetchall(sql, params))

    async def with_completed(self, prediction_ids: Sequence[str]) -> set[str]:
        """Which of these predictions have a `completed` row already."""
        found: set[str] = set()
        for start in range(0, len(prediction_ids), 500):
            chunk = prediction_ids[start : start + 500]
            rows = await self._fetch(
                "SELECT prediction_id FROM webhook_deliveries WHERE event = 'completed' "
                f"AND prediction_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            found.update(row[0] for row in rows)
        return found

    async def pending(self, *, from_seq: int, limit: int) -> list[Delivery]:
        """Pending deliveries with `seq >= from_seq`, oldest first."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM webhook_deliveries WHERE status = 'pending' AND seq >= ? "
            "ORDER BY seq LIMIT ?",
            (from_seq, limit),
        )
        return [_delivery(row) for row in rows]

    async def listing(
        self,
        *,
        status: DeliveryStatus | None,
        limit: int,
        before_seq: int | None = None,
        prediction_id: str | None = None,
    ) -> list[Delivery]:
        """Deliveries newest first, optionally of one status or one prediction."""
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(str(status))
        if before_seq is not None:
            where.append("seq < ?")
            params.append(before_seq)
        if prediction_id is not None:
            where.append("prediction_id = ?")
            params.append(prediction_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM webhook_deliveries {clause} ORDER BY seq DESC LIMIT ?",
            (*params, limit),
        )
        return [_delivery(row) for row in rows]

    async def attempts(self, delivery_id: str) -> list[Attempt]:
        """Every attempt of one delivery, in order."""
        rows = await self._fetch(
            "SELECT started_at, duration, status_code, error FROM webhook_attempts "
            "WHERE delivery_id = ? ORDER BY attempt",
            (delivery_id,),
        )
        return [Attempt(started_at=r[0], duration=r[1], status_code=r[2], error=r[3]) for r in rows]
