"""The real server as a subprocess: SIGKILL mid-generation, and the graceful SIGTERM path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.app import RESTART_ERROR
from tests.conftest import AUTH, TOKEN

pytestmark = pytest.mark.smollm

ROOT = Path(__file__).resolve().parent.parent
SMOL = "huggingfacetb/smollm2-135m-instruct"
LONG = {"prompt": "Tell me a very long story.", "max_tokens": 600, "min_tokens": 600}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, tmp_path: Path, weights: Path, grace: float) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.catalog = tmp_path / "catalog.toml"
        self.catalog.write_text(
            f'[[model]]\nname = "{SMOL}"\nbackend = "ctranslate2"\nweights = "{weights}"\n'
            'schema = "huggingfacetb__smollm2-135m-instruct.json"\n'
            "[model.settings]\nseeded_spare = false\n"
        )
        self.data = tmp_path / "data"
        self.grace = grace
        #: The server's own log, shown when a test about its exit fails.
        self.log = tmp_path / "server.log"
        self.log_file = self.log.open("ab")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "REPLICANT_API_TOKENS": TOKEN}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "serve",
            "--port",
            str(self.port),
            "--catalog",
            str(self.catalog),
            "--data-dir",
            str(self.data),
            "--shutdown-grace",
            str(self.grace),
            "--log-level",
            "warning",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self.log_file,
        )
        async with aiohttp.ClientSession() as session, asyncio.timeout(60):
            while True:
                try:
                    async with session.get(f"{self.base}/health-check") as resp:
                        if (await resp.json())["status"] == "READY":
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)

    async def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def exit_code(self) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), 60)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def kill(self) -> None:
        """Leave no server behind, whatever the test did."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        self.log_file.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        yield s


async def create(
    session: aiohttp.ClientSession, base: str, inputs: dict[str, Any]
) -> dict[str, Any]:
    async with session.post(f"{base}/v1/models/{SMOL}/predictions", json={"input": inputs}) as resp:
        assert resp.status == 201, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def get(session: aiohttp.ClientSession, base: str, prediction_id: str) -> dict[str, Any]:
    async with session.get(f"{base}/v1/predictions/{prediction_id}") as resp:
        body: dict[str, Any] = await resp.json()
        return body


def stored_output(database: Path, prediction_id: str) -> Any:
    with contextlib.closing(sqlite3.connect(database)) as db:
        row = db.execute("SELECT output FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
    return json.loads(row[0]) if row and row[0] else None


async def until_stored_output(server: Server, prediction_id: str) -> None:
    """Until the prediction's output has reached SQLite (flushed while it runs)."""
    database = server.data / "replicant.sqlite3"
    async with asyncio.timeout(60):
        # Another process's database: there is no event to wait on, so poll it.
        while not await asyncio.to_thread(stored_output, database, prediction_id):  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_sigkill_mid_generation_then_restart(
    tmp_path: Path, smollm_model: Path, session: aiohttp.ClientSession, servers: list[Server]
) -> None:
    server = Server(tmp_path, smollm_model, grace=30)
    servers.append(server)
    await server.start()
    running = await create(session, server.base, LONG)
    queued = [await create(session, server.base, {**LONG, "seed": i}) for i in range(2)]
    await until_stored_output(server, running["id"])
    await server.signal(signal.SIGKILL)
    assert await server.exit_code() == -signal.SIGKILL

    await server.start()
    for p in [running, *queued]:
        after = await get(session, server.base, p["id"])
        assert after["status"] == "failed", after
        assert after["error"] == RESTART_ERROR
        assert after["completed_at"] is not None
    # What had streamed before the kill is still there.
    assert (await get(session, server.base, running["id"]))["output"]
    await server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0, server.log_tail()


async def test_sigterm_drains_then_cancels_and_exits_zero(
    tmp_path: Path, smollm_model: Path, session: aiohttp.ClientSession, servers: list[Server]
) -> None:
    server = Server(tmp_path, smollm_model, grace=1.5)
    servers.append(server)
    await server.start()
    short = await create(
        session, server.base, {"prompt": "Say hi.", "max_tokens": 3, "temperature": 0}
    )
    long = await create(session, server.base, LONG)
    await until_stored_output(server, long["id"])
    await server.signal(signal.SIGTERM)
    # While draining the server still answers: reads work, creates get 503.
    async with asyncio.timeout(5):
        while True:
            async with session.post(
                f"{server.base}/v1/models/{SMOL}/predictions", json={"input": {"prompt": "x"}}
            ) as resp:
                if resp.status == 503:
                    assert resp.headers["Retry-After"]
                    assert resp.content_type == "application/problem+json"
                    break
                # The signal may not have landed yet; a create before it is simply canceled.
                assert resp.status == 201
            await asyncio.sleep(0.05)
    assert await server.exit_code() == 0, server.log_tail()

    await server.start()
    assert (await get(session, server.base, short["id"]))["status"] == "succeeded"
    after = await get(session, server.base, long["id"])
    assert after["status"] == "canceled"
    assert "shut down" in after["error"]
    assert 0 < len(after["output"]) < 600
    await server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0, server.log_tail()
