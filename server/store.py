"""PredictionStore: predictions in SQLite (aiosqlite, WAL), with versioned migrations.

The store is the durable record. Running predictions live in memory (`server.predictions`)
and are written here on create (committed before the 201), on each status change, on a short
flush interval while output grows, and when they end: never once per token.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
import attrs

from server.records import Prediction, Status, format_time, parse_time, utcnow

log = logging.getLogger(__name__)

#: Each entry moves the schema one version up; never edit one that has shipped.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE predictions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        input TEXT NOT NULL,
        output TEXT,
        logs TEXT NOT NULL DEFAULT '',
        error TEXT,
        status TEXT NOT NULL,
        created_at TEXT NOT NULL,
        started_at TEXT,
        completed_at TEXT,
        metrics TEXT NOT NULL DEFAULT '{}',
        source TEXT NOT NULL DEFAULT 'api',
        webhook TEXT,
        webhook_events_filter TEXT,
        stream_token TEXT UNIQUE,
        deadline TEXT,
        data_removed INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX predictions_unfinished ON predictions (status)
        WHERE status IN ('starting', 'processing');
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: the webhook outbox (server.webhooks.outbox). Times are unix seconds. A `completed`
    # delivery is one row, retried in place; intermediate events get a row only if they failed.
    """
    CREATE TABLE webhook_deliveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        prediction_id TEXT NOT NULL,
        event TEXT NOT NULL,
        url TEXT NOT NULL,
        body TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        retry_until REAL NOT NULL,
        last_attempt_at REAL,
        last_status_code INTEGER,
        last_error TEXT,
        finished_at REAL
    );
    CREATE UNIQUE INDEX webhook_deliveries_completed ON webhook_deliveries (prediction_id)
        WHERE event = 'completed';
    CREATE INDEX webhook_deliveries_status ON webhook_deliveries (status, seq);
    CREATE TABLE webhook_attempts (
        delivery_id TEXT NOT NULL REFERENCES webhook_deliveries (id),
        attempt INTEGER NOT NULL,
        started_at REAL NOT NULL,
        duration REAL NOT NULL,
        status_code INTEGER,
        error TEXT,
        PRIMARY KEY (delivery_id, attempt)
    );
    CREATE INDEX predictions_webhook_completed ON predictions (completed_at)
        WHERE webhook IS NOT NULL;
    """,
    # 3: uploaded files (server.files); the bytes are in <data dir>/files/<id>.
    """
    CREATE TABLE files (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        content_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        md5 TEXT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL
    );
    """,
)

_COLUMNS = (
    "id, model, version, input, output, logs, error, status, created_at, started_at, "
    "completed_at, metrics, source, webhook, webhook_events_filter, stream_token, deadline, "
    "data_removed"
)


@attrs.frozen
class Page:
    predictions: list[Prediction]
    next_cursor: str | None
    previous_cursor: str | None


class CursorInvalid(ValueError):
    pass


#: The largest integer SQLite stores: bigger ids and cursors from clients are refused, not
#: passed on (sqlite3 raises OverflowError for them).
SQLITE_MAX_INT = 2**63 - 1


def first_row(rows: Iterable[Any]) -> Any:
    """The first row of an `execute_fetchall`, or None.

    Reads go through `execute_fetchall`, which runs the whole query in one step on
    aiosqlite's thread: a cursor fetched across awaits keeps a read snapshot open, and a
    write that another coroutine sends on the same connection meanwhile fails at once with
    "database is locked" if another connection committed since the snapshot was taken.
    """
    return next(iter(rows), None)


def _encode_cursor(direction: str, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{direction}:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        direction, _, seq = raw.partition(":")
        if direction not in ("n", "p") or not 0 <= int(seq) <= SQLITE_MAX_INT:
            raise ValueError(direction)
        return direction, int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise CursorInvalid(cursor) from exc


def _row(p: Prediction) -> tuple[Any, ...]:
    return (
        p.id,
        p.model,
        p.version,
        json.dumps(p.input),
        json.dumps(p.output),
        p.logs,
        p.error,
        str(p.status),
        format_time(p.created_at),
        format_time(p.started_at),
        format_time(p.completed_at),
        json.dumps(p.metrics),
        p.source,
        p.webhook,
        json.dumps(list(p.webhook_events_filter)),
        p.stream_token,
        format_time(p.deadline),
        int(p.data_removed),
    )


def _prediction(row: Sequence[Any]) -> Prediction:
    created = parse_time(row[8])
    assert created is not None
    return Prediction(
        id=row[0],
        model=row[1],
        version=row[2],
        input=json.loads(row[3]),
        output=json.loads(row[4]) if row[4] is not None else None,
        logs=row[5],
        error=row[6],
        status=Status(row[7]),
        created_at=created,
        started_at=parse_time(row[9]),
        completed_at=parse_time(row[10]),
        metrics=json.loads(row[11]),
        source=row[12],
        webhook=row[13],
        webhook_events_filter=tuple(json.loads(row[14])) if row[14] else (),
        stream_token=row[15],
        deadline=parse_time(row[16]),
        data_removed=bool(row[17]),
    )


class PredictionStore:
    """Async access to the predictions table. Open with `PredictionStore.open(path)`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> PredictionStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA busy_timeout=5000")
        store = cls(db)
        await store._migrate()
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _migrate(self) -> None:
        row = first_row(await self._db.execute_fetchall("PRAGMA user_version"))
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {current} is newer than this server knows "
                f"({len(MIGRATIONS)}); upgrade replicant"
            )
        for version in range(current, len(MIGRATIONS)):
            log.info("migrating database to schema version %d", version + 1)
            await self._db.executescript(
                f"BEGIN; {MIGRATIONS[version]} PRAGMA user_version = {version + 1}; COMMIT;"
            )

    async def insert(self, prediction: Prediction) -> None:
        # Cursors are closed here, on aiosqlite's thread: one left to the garbage collector
        # resets its statement from the event loop's thread, maybe while the same cached
        # statement runs for another caller ("bad parameter or other API misuse").
        async with self._db.execute(
            f"INSERT INTO predictions ({_COLUMNS}) VALUES ({', '.join('?' * 18)})",
            _row(prediction),
        ):
            pass
        await self._db.commit()

    async def save(self, predictions: Sequence[Prediction]) -> None:
        """Write the current state of existing predictions in one transaction."""
        if not predictions:
            return
        async with self._db.executemany(
            "UPDATE predictions SET output = ?, logs = ?, error = ?, status = ?, "
            "started_at = ?, completed_at = ?, metrics = ?, data_removed = ? WHERE id = ?",
            [
                (
                    json.dumps(p.output),
                    p.logs,
                    p.error,
                    str(p.status),
                    format_time(p.started_at),
                    format_time(p.completed_at),
                    json.dumps(p.metrics),
                    int(p.data_removed),
                    p.id,
                )
                for p in predictions
            ],
        ):
            pass
        await self._db.commit()

    async def get(self, prediction_id: str) -> Prediction | None:
        row = first_row(
            await self._db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM predictions WHERE id = ?", (prediction_id,)
            )
        )
        return _prediction(row) if row else None

    async def get_by_stream_token(self, token: str) -> Prediction | None:
        row = first_row(
            await self._db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM predictions WHERE stream_token = ?", (token,)
            )
        )
        return _prediction(row) if row else None

    async def page(
        self,
        *,
        limit: int,
        cursor: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> Page:
        """A page of predictions, newest first; raises CursorInvalid for a cursor we never made."""
        where: list[str] = []
        params: list[Any] = []
        if created_after is not None:
            where.append("created_at > ?")
            params.append(format_time(created_after))
        if created_before is not None:
            where.append("created_at < ?")
            params.append(format_time(created_before))
        backwards = False
        if cursor is not None:
            direction, seq = _decode_cursor(cursor)
            backwards = direction == "p"
            where.append("seq > ?" if backwards else "seq < ?")
            params.append(seq)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "ASC" if backwards else "DESC"
        rows = list(
            await self._db.execute_fetchall(
                f"SELECT seq, {_COLUMNS} FROM predictions {clause} ORDER BY seq {order} LIMIT ?",
                (*params, limit + 1),
            )
        )
        more = len(rows) > limit
        rows = rows[:limit]
        if backwards:
            rows.reverse()
        seqs = [int(r[0]) for r in rows]
        predictions = [_prediction(r[1:]) for r in rows]
        if not seqs:
            return Page(predictions, None, None)
        has_newer = (backwards and more) or (not backwards and cursor is not None)
        has_older = (not backwards and more) or backwards
        return Page(
            predictions,
            _encode_cursor("n", seqs[-1]) if has_older else None,
            _encode_cursor("p", seqs[0]) if has_newer else None,
        )

    async def count_for_model(self, model: str) -> int:
        row = first_row(
            await self._db.execute_fetchall(
                "SELECT COUNT(*) FROM predictions WHERE model = ?", (model,)
            )
        )
        return int(row[0]) if row else 0

    async def fail_unfinished(self, error: str) -> list[Prediction]:
        """Mark predictions a previous process left running as failed (crash recovery)."""
        rows = list(
            await self._db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM predictions WHERE status IN ('starting', 'processing')"
            )
        )
        failed = []
        for row in rows:
            prediction = _prediction(row)
            prediction.error = error
            prediction.logs += f"{error}\n"
            prediction.transition(Status.FAILED)
            failed.append(prediction)
        await self.save(failed)
        return failed

    async def append_logs(self, prediction_id: str, text: str) -> None:
        """Add text to the logs of a stored prediction (one that is no longer running)."""
        async with self._db.execute(
            "UPDATE predictions SET logs = logs || ? WHERE id = ?", (text, prediction_id)
        ):
            pass
        await self._db.commit()

    async def finished_with_webhook(self, since: datetime) -> list[Prediction]:
        """Predictions with a webhook that reached a terminal state at or after `since`."""
        rows = await self._db.execute_fetchall(
            f"SELECT {_COLUMNS} FROM predictions WHERE webhook IS NOT NULL "
            "AND completed_at >= ? AND status IN ('succeeded', 'failed', 'canceled') "
            "ORDER BY completed_at",
            (format_time(since),),
        )
        return [_prediction(row) for row in rows]


__all__ = ["SQLITE_MAX_INT", "CursorInvalid", "Page", "PredictionStore", "first_row", "utcnow"]
