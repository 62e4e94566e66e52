"""Runner: one per served model. Loads the backend, queues jobs, batches them, runs them.

Admission is decided up front (`admit` raises QueueFull when the bounded queue has no room).
A queued job's input is prepared (e.g. images downloaded) while it waits, so the model never
waits on the network. Prepared jobs run in arrival order on the runner's own single-thread
executor; jobs whose `batch_key` matches may share one backend call. When a job arrives that
could join the running batch, the runner sets `yield_event` and a backend that can pause
(see `models.base.Paused`) stops early so the next batch includes the newcomer.

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

from models.base import Backend, Job, LoadInfo, Outcome, Paused
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
    finished: Callable[[Outcome], None]
    #: Awaited while the job waits in the queue (e.g. to download image inputs); an
    #: exception fails this job only.
    prepare: Callable[[], Awaitable[None]] | None = None
    #: True once `prepare` is done (or there is nothing to prepare).
    ready: bool = False
    #: True once the job has run at least once (it may come back Paused).
    begun: bool = False
    preparing: asyncio.Task[None] | None = None


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
        self.running: list[QueuedJob] = []
        #: Set once loading has finished, whether it succeeded or not.
        self.loaded = asyncio.Event()
        #: How many batches of each size have run (for tests and /metrics).
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._backend_factory = backend_factory
        self._queue: collections.deque[QueuedJob] = collections.deque()
        self._queue_size = queue_size
        #: Places promised by `admit` to creates that have not submitted yet.
        self._reserved = 0
        self._wakeup = asyncio.Event()
        #: Set while a batch runs when waiting jobs could join it (the backend may pause).
        self._yield = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        return len(self._queue) + self._reserved >= self._queue_size

    # -- lifecycle --------------------------------------------------------------------------

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
            self._fail_queued(f"model {self.name} failed to load: {self.setup_error}")
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

    # -- the queue --------------------------------------------------------------------------

    def admit(self) -> None:
        """Reserve a place in the queue, or raise QueueFull (429).

        Admission is decided once, before a create validates and stores anything; the place
        is then the create's own, to `submit` into or to give back with `release`.
        """
        if self.full:
            raise QueueFull(
                f"The queue of {self.name} is full ({self._queue_size} waiting); retry shortly.",
                headers={"Retry-After": "1"},
            )
        self._reserved += 1

    def release(self) -> None:
        """Give back a place reserved by `admit` that will not be used."""
        self._reserved -= 1

    def submit(self, queued: QueuedJob) -> None:
        """Queue a job into the place its create reserved with `admit`."""
        self._reserved -= 1
        if self.state is RunnerState.SETUP_FAILED:
            queued.finished(RuntimeError(f"model {self.name} failed to load: {self.setup_error}"))
            return
        self._queue.append(queued)
        if queued.prepare is None:
            queued.ready = True
            self._job_ready(queued)
        else:
            queued.preparing = asyncio.create_task(
                self._prepare(queued), name=f"prepare-{self.name}"
            )

    async def _prepare(self, queued: QueuedJob) -> None:
        assert queued.prepare is not None
        try:
            await queued.prepare()
        except Exception as exc:
            if self._drop(queued):
                queued.finished(exc)
            return
        queued.ready = True
        self._job_ready(queued)

    def _job_ready(self, queued: QueuedJob) -> None:
        if self._could_join(queued):
            self._yield.set()
        self._wakeup.set()

    def _could_join(self, queued: QueuedJob) -> bool:
        """Whether a waiting job could share the running batch if the backend paused it."""
        running = self.running
        backend = self.backend
        return (
            backend is not None
            and bool(running)
            and queued.ready
            and queued.batch_key is not None
            and queued.batch_key == running[0].batch_key
            and len(running) < backend.max_batch_size
        )

    def _drop(self, queued: QueuedJob) -> bool:
        try:
            self._queue.remove(queued)
        except ValueError:
            return False
        if queued.preparing is not None and not queued.preparing.done():
            queued.preparing.cancel()
        return True

    def remove(self, job: Job) -> bool:
        """Take a job that is not running out of the queue; False if it is not queued."""
        for queued in self._queue:
            if queued.job is job:
                return self._drop(queued)
        return False

    def _fail_queued(self, reason: str) -> None:
        while self._queue:
            queued = self._queue.popleft()
            if queued.preparing is not None:
                queued.preparing.cancel()
            queued.finished(RuntimeError(reason))

    def _take_batch(self) -> list[QueuedJob]:
        """The oldest ready job and, up to the batch size, later ready ones with its key."""
        head = next((q for q in self._queue if q.ready), None)
        if head is None:  # the ready ones left (canceled) while the batch was gathering
            return []
        assert self.backend is not None
        batch = [head]
        limit = self.backend.max_batch_size if head.batch_key is not None else 1
        for queued in self._queue:
            if len(batch) >= limit:
                break
            if queued is not head and queued.ready and queued.batch_key == head.batch_key:
                batch.append(queued)
        for queued in batch:
            self._queue.remove(queued)
        return batch

    # -- running ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        backend = self.backend
        assert backend is not None
        while True:
            if not any(q.ready for q in self._queue):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            ready = sum(q.ready for q in self._queue)
            if backend.batch_window > 0 and ready < backend.max_batch_size:
                # A short gathering window lets near-simultaneous requests share a batch.
                await asyncio.sleep(backend.batch_window)
            batch = self._start_batch(self._take_batch())
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

    def _start_batch(self, batch: list[QueuedJob]) -> list[QueuedJob]:
        """Mark jobs started; jobs canceled meanwhile end here without running."""
        ready = []
        for queued in batch:
            if not queued.begun:
                queued.begun = True
                queued.started()
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
