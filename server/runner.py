"""Runner: one per served model. Loads the backend, queues jobs, batches them, runs them.

Admission is decided up front (`admit` raises QueueFull when the bounded queue has no room),
jobs run in arrival order on the runner's own single-thread executor, and jobs whose
`batch_key` matches may run together in one backend call, gathered for a short window.
The runner knows jobs, not predictions: it reports through each job's `started` and
`finished` callbacks, which `server.predictions` supplies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import threading
from collections.abc import Awaitable, Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from models.base import Backend, Job, LoadInfo, Paused
from server.errors import QueueFull

log = logging.getLogger(__name__)


class RunnerState(enum.StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    SETUP_FAILED = "SETUP_FAILED"
    DEFUNCT = "DEFUNCT"


@attrs.define(eq=False, kw_only=True)
class QueuedJob:
    job: Job
    batch_key: Hashable | None
    started: Callable[[], None]
    finished: Callable[[BaseException | None], None]
    #: Awaited after `started` and before the model runs (e.g. to download image inputs);
    #: an exception fails this job only.
    prepare: Callable[[], Awaitable[None]] | None = None
    #: True once the job has run at least once (it may come back Paused).
    begun: bool = False


class Runner:
    def __init__(
        self,
        name: str,
        backend_factory: Callable[[], Backend],
        *,
        queue_size: int,
    ) -> None:
        self.name = name
        self.state = RunnerState.STARTING
        self.setup_error: str | None = None
        self.load_info: LoadInfo | None = None
        self.backend: Backend | None = None
        self._backend_factory = backend_factory
        self._queue: collections.deque[QueuedJob] = collections.deque()
        self._queue_size = queue_size
        #: Set while a batch runs when waiting jobs could join it (the backend may pause).
        self._yield = threading.Event()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self._task: asyncio.Task[None] | None = None
        self.running: list[QueuedJob] = []
        #: Set once loading has finished, whether it succeeded or not.
        self.loaded = asyncio.Event()
        #: How many batches of each size have run (for tests and /metrics).
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        return len(self._queue) >= self._queue_size

    async def start(self) -> None:
        """Load the model on the executor, then start serving the queue."""
        loop = asyncio.get_running_loop()
        try:
            self.backend = await loop.run_in_executor(self._executor, self._backend_factory)
            self.load_info = await loop.run_in_executor(self._executor, self.backend.load)
        except Exception as exc:  # a broken model must not take the server down
            log.exception("model %s failed to load", self.name)
            self.state = RunnerState.SETUP_FAILED
            self.setup_error = f"{type(exc).__name__}: {exc}"
            self._fail_queued()
            self.loaded.set()
            return
        self.state = RunnerState.READY
        self.loaded.set()
        log.info("model %s ready on %s", self.name, self.load_info.device)
        self._task = asyncio.create_task(self._serve(), name=f"runner-{self.name}")

    async def stop(self) -> None:
        for queued in self.running:
            queued.job.cancel_event.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_queued("the server is shutting down")
        backend = self.backend
        if backend is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, backend.close)
        # Waiting for the model thread blocks, so it happens off the event loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def admit(self) -> None:
        """Raise QueueFull (429) unless a new job would fit in the queue."""
        if self.full:
            raise QueueFull(
                f"The queue of {self.name} is full ({self._queue_size} waiting); retry shortly.",
                headers={"Retry-After": "1"},
            )

    def submit(self, queued: QueuedJob) -> None:
        self.admit()
        self._queue.append(queued)
        if self.state is RunnerState.SETUP_FAILED:
            self._fail_queued()
        elif self._could_join(queued):
            self._yield.set()
        self._wakeup.set()

    def _could_join(self, queued: QueuedJob) -> bool:
        """Whether a new job could share the running batch if the backend paused it."""
        running = self.running
        backend = self.backend
        return (
            backend is not None
            and bool(running)
            and queued.batch_key is not None
            and queued.batch_key == running[0].batch_key
            and len(running) < backend.max_batch_size
        )

    def remove(self, job: Job) -> bool:
        """Take a job that has not started out of the queue; False if it is not queued."""
        for queued in self._queue:
            if queued.job is job:
                self._queue.remove(queued)
                return True
        return False

    def _fail_queued(self, reason: str | None = None) -> None:
        message = reason or f"model {self.name} failed to load: {self.setup_error}"
        while self._queue:
            self._queue.popleft().finished(RuntimeError(message))

    def _take_batch(self) -> list[QueuedJob]:
        """The oldest job and, up to the batch size, later ones with the same batch key."""
        head = self._queue.popleft()
        assert self.backend is not None
        limit = self.backend.max_batch_size
        batch = [head]
        if head.batch_key is None or limit <= 1:
            return batch
        for queued in list(self._queue):
            if len(batch) >= limit:
                break
            if queued.batch_key == head.batch_key:
                self._queue.remove(queued)
                batch.append(queued)
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        backend = self.backend
        assert backend is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if backend.batch_window > 0 and len(self._queue) < backend.max_batch_size:
                # A short gathering window lets near-simultaneous requests share a batch.
                await asyncio.sleep(backend.batch_window)
            if not self._queue:
                continue
            batch = await self._start_batch(self._take_batch())
            if not batch:
                continue
            self._yield.clear()
            if any(self._could_join(q) for q in self._queue):
                self._yield.set()
            try:
                outcomes = await loop.run_in_executor(
                    self._executor, backend.run_batch, [q.job for q in batch], self._yield
                )
            except Exception as exc:  # the backend failed as a whole: fail the batch only
                log.exception("model %s failed a batch of %d", self.name, len(batch))
                outcomes = [exc] * len(batch)
            finally:
                self.running = []
            self.batch_sizes[len(batch)] += 1
            paused = [q for q, o in zip(batch, outcomes, strict=True) if isinstance(o, Paused)]
            # Paused jobs go back to the front, in order, to resume in a bigger batch.
            self._queue.extendleft(reversed(paused))
            for queued, outcome in zip(batch, outcomes, strict=True):
                if not isinstance(outcome, Paused):
                    queued.finished(outcome)

    async def _start_batch(self, batch: list[QueuedJob]) -> list[QueuedJob]:
        """Mark jobs started and prepare their inputs; jobs that fail to prepare end here."""
        self.running = batch
        ready = []
        for queued in batch:
            if queued.begun:  # a paused job resuming: started and prepared already
                ready.append(queued)
                continue
            queued.begun = True
            queued.started()
            if queued.prepare is not None:
                try:
                    await queued.prepare()
                except Exception as exc:
                    queued.finished(exc)
                    continue
            if queued.job.canceled:
                queued.finished(None)
                continue
            ready.append(queued)
        self.running = ready
        return ready

    def describe(self) -> Mapping[str, Any]:
        info: dict[str, Any] = {"status": str(self.state), "queue_depth": self.queue_depth}
        if self.load_info is not None:
            info["device"] = self.load_info.device
            if self.load_info.detail:
                info["detail"] = self.load_info.detail
        if self.setup_error is not None:
            info["error"] = self.setup_error
        return info
