"""Reads and writes from many coroutines on the store, while other connections write the file.

The server has three connections to its SQLite file (predictions, webhook outbox, files).
Reads on one connection interleaved with writes from another coroutine on the same
connection must never surface SQLite's "database is locked".
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite

from server.records import Prediction
from server.store import PredictionStore

ROUNDS = 150


async def test_interleaved_reads_and_writes_never_lock(tmp_path: Path) -> None:
    path = tmp_path / "replicant.sqlite3"
    store = await PredictionStore.open(path)
    other = await aiosqlite.connect(path)
    await other.execute("PRAGMA busy_timeout=5000")
    await other.execute("CREATE TABLE IF NOT EXISTS side (n INTEGER)")
    await other.commit()
    try:
        for i in range(40):
            await store.insert(Prediction(id=f"seed{i:022d}", model="o/n", version="v", input={}))

        async def reader() -> None:
            for _ in range(ROUNDS):
                page = await store.page(limit=20)
                assert len(page.predictions) == 20
                await store.count_for_model("o/n")

        async def writer() -> None:
            for i in range(ROUNDS):
                await store.insert(
                    Prediction(id=f"new{i:023d}", model="o/n", version="v", input={"i": i})
                )

        async def outsider() -> None:
            for i in range(ROUNDS):
                async with other.execute("INSERT INTO side VALUES (?)", (i,)):
                    pass
                await other.commit()

        await asyncio.gather(reader(), reader(), writer(), outsider())
        assert await store.count_for_model("o/n") == 40 + ROUNDS
    finally:
        await other.close()
        await store.close()
