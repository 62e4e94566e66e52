"""The runner's queue on its own, with a minimal backend (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from models.base import Backend, Job, LoadInfo, Outcome
from server.runner import QueuedJob, Runner


class _Sink:
    def output(self, chunk: Any) -> None: ...
    def log(self, text: str) -> None: ...
    def metrics(self, values: Mapping[str, float | int]) -> None: ...


class _Echo(Backend):
    """Finishes every job at once; gathers batches for 50 ms first."""

    max_batch_size = 4
    batch_window = 0.05

    def __init__(self) -> None:
        self.ran: list[Any] = []

    def load(self) -> LoadInfo:
        return LoadInfo(device="cpu")

    def run_batch(self, jobs: Sequence[Job], yield_event: threading.Event) -> Sequence[Outcome]:
        self.ran.extend(job.input["n"] for job in jobs)
        return [None] * len(jobs)


def _queued(runner: Runner, n: int, done: asyncio.Future[Outcome]) -> QueuedJob:
    runner.admit()
    return QueuedJob(
        job=Job(input={"n": n}, provided=frozenset({"n"}), sink=_Sink()),
        batch_key="same",
        started=lambda: None,
        finished=done.set_result,
    )


async def test_a_job_removed_while_a_batch_gathers_does_not_stop_the_runner() -> None:
    backend = _Echo()
    runner = Runner("o/n", lambda: backend, queue_size=8)
    await runner.start()
    try:
        loop = asyncio.get_running_loop()
        first: asyncio.Future[Outcome] = loop.create_future()
        queued = _queued(runner, 1, first)
        runner.submit(queued)
        await asyncio.sleep(0.01)  # the runner is inside its gathering window now
        assert runner.remove(queued.job)  # canceled before it ran
        await asyncio.sleep(0.1)  # the window ends with nothing ready

        second: asyncio.Future[Outcome] = loop.create_future()
        runner.submit(_queued(runner, 2, second))
        assert await asyncio.wait_for(second, 5) is None
        assert backend.ran == [2]
        assert not first.done()
    finally:
        await runner.stop()
