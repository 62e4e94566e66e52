"""PredictionService: the lifecycle of predictions, from create to a stored terminal state.

This is the one place that changes a `Prediction`. It admits and validates a create, commits
the new row before the route answers, hands a `Job` to the model's `Runner`, turns what the
model reports (through a thread-safe sink) into state changes and stream events, flushes
running predictions to SQLite on a short interval, and stores the terminal state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import attrs

from models.base import Backend, Job, ModelInputError
from models.catalog import ModelEntry
from server.errors import InputInvalid, NotFound, Unavailable
from server.events import EventLog, StreamEvent, done_events, event_id
from server.records import Prediction, Status, new_prediction_id
from server.runner import QueuedJob, Runner, RunnerState
from server.store import PredictionStore
from server.validation import InputValidator, ValidatedInput

log = logging.getLogger(__name__)

#: Called on every change a webhook or a metric may care about: (prediction, event name).
#: Event names: created, start, output, logs, completed.
Listener = Callable[[Prediction, str], None]
#: Awaited when a job is about to run, to turn its input into what the model takes (for
#: example, download `format: uri` inputs); may replace `job.input`. Raising fails the job.
InputPreparer = Callable[[ModelEntry, Job], Awaitable[None]]


@attrs.frozen(kw_only=True)
class CreateRequest:
    input: Any
    webhook: str | None = None
    webhook_events_filter: tuple[str, ...] | None = None
    source: str = "api"
    #: Seconds from creation after which the prediction is canceled (`Cancel-After`).
    cancel_after: float | None = None


@attrs.define(eq=False, kw_only=True)
class LivePrediction:
    """A prediction that has not finished: its state, its event log and its job."""

    prediction: Prediction
    events: EventLog
    job: Job
    runner: Runner
    done: asyncio.Event = attrs.field(factory=asyncio.Event)
    dirty: bool = False
    #: Why it was canceled, when the server did it (a deadline); shown as its error.
    cancel_reason: str | None = None
    deadline_timer: asyncio.TimerHandle | None = None


class _ThreadSink:
    """The `Sink` a backend reports to; each call hops onto the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, service: PredictionService, prediction_id: str
    ) -> None:
        self._loop = loop
        self._service = service
        self._id = prediction_id

    def output(self, chunk: Any) -> None:
        self._loop.call_soon_threadsafe(self._service._on_output, self._id, chunk)

    def log(self, text: str) -> None:
        self._loop.call_soon_threadsafe(self._service._on_log, self._id, text)

    def metrics(self, values: Mapping[str, float | int]) -> None:
        self._loop.call_soon_threadsafe(self._service._on_metrics, self._id, dict(values))


class PredictionService:
    def __init__(
        self,
        store: PredictionStore,
        runners: Mapping[str, Runner],
        *,
        flush_interval: float,
        max_input_chars: int = 1_000_000,
    ) -> None:
        self.store = store
        self.runners = runners
        self.listeners: list[Listener] = []
        self.input_preparer: InputPreparer | None = None
        self._validators: dict[str, InputValidator] = {}
        self._live: dict[str, LivePrediction] = {}
        #: Event logs of recently finished predictions, for late stream readers.
        self._recent: dict[str, EventLog] = {}
        self._flush_interval = flush_interval
        self._max_input_chars = max_input_chars
        self._accepting = True
        #: Background tasks (finishing, deadline cancels), kept so they are not collected.
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- creating ---------------------------------------------------------------------------

    def validator(self, entry: ModelEntry) -> InputValidator:
        validator = self._validators.get(entry.ref)
        if validator is None:
            validator = self._validators[entry.ref] = InputValidator(
                entry.schema, max_string_chars=self._max_input_chars
            )
        return validator

    async def create(self, entry: ModelEntry, version: str, request: CreateRequest) -> Prediction:
        """Admit, validate, store (committed) and enqueue a prediction."""
        if not self._accepting:
            raise Unavailable(
                "The server is shutting down and takes no new predictions.",
                headers={"Retry-After": "5"},
            )
        runner = self.runners[entry.ref]
        runner.admit()
        try:
            prediction, checked, backend = await self._check(entry, version, request, runner)
            job = Job(
                input=checked.values,
                provided=checked.provided,
                sink=_ThreadSink(asyncio.get_running_loop(), self, prediction.id),
            )
            await self.store.insert(prediction)
        except BaseException:
            runner.release()
            raise
        live = LivePrediction(prediction=prediction, events=EventLog(), job=job, runner=runner)
        if prediction.logs:
            live.events.append(
                StreamEvent("logs", prediction.logs, event_id(0, len(prediction.logs)))
            )
        self._live[prediction.id] = live
        if prediction.deadline is not None:
            delay = (prediction.deadline - prediction.created_at).total_seconds()
            live.deadline_timer = asyncio.get_running_loop().call_later(
                delay, self._deadline_passed, prediction.id, delay
            )
        runner.submit(
            QueuedJob(
                job=job,
                batch_key=backend.batch_key(checked.values, checked.provided),
                started=lambda: self._on_started(prediction.id),
                finished=lambda outcome: self._on_finished(prediction.id, outcome),
                prepare=self._preparer(entry, job),
            )
        )
        self._notify(prediction, "created")
        return prediction

    async def _check(
        self, entry: ModelEntry, version: str, request: CreateRequest, runner: Runner
    ) -> tuple[Prediction, ValidatedInput, Backend]:
        """Validate a create against the schema and the model; the new, unsaved prediction."""
        checked = self.validator(entry).validate(request.input)
        # A model still loading: the create waits for it, as a cold start does on Replicate.
        await runner.loaded.wait()
        backend = runner.backend
        if runner.state is not RunnerState.READY or backend is None:
            raise Unavailable(
                f"Model {entry.ref} is not available: {runner.setup_error or runner.state}",
                headers={"Retry-After": "30"},
            )
        try:
            # Backends may tokenize here; keep that off the event loop.
            await asyncio.to_thread(backend.check_input, checked.values, checked.provided)
        except ModelInputError as exc:
            raise InputInvalid([{"field": exc.field, "message": exc.message}]) from exc
        prediction = Prediction(
            id=new_prediction_id(),
            model=entry.ref,
            version=version,
            input=request.input,
            source=request.source,
            webhook=request.webhook,
            stream_token=secrets.token_urlsafe(32) if entry.schema.output_is_iterator else None,
        )
        if request.webhook_events_filter is not None:
            prediction.webhook_events_filter = request.webhook_events_filter
        limits = [t for t in (request.cancel_after, entry.max_prediction_time) if t]
        if limits:
            prediction.deadline = prediction.created_at + timedelta(seconds=min(limits))
        if checked.ignored:
            prediction.logs = (
                f"Ignored input fields not in the schema: {', '.join(checked.ignored)}\n"
            )
        return prediction, checked, backend

    def _preparer(self, entry: ModelEntry, job: Job) -> Callable[[], Awaitable[None]] | None:
        preparer = self.input_preparer
        if preparer is None:
            return None

        async def prepare() -> None:
            await preparer(entry, job)

        return prepare

    # -- reading ----------------------------------------------------------------------------

    async def get(self, prediction_id: str) -> Prediction | None:
        live = self._live.get(prediction_id)
        if live is not None:
            return live.prediction
        return await self.store.get(prediction_id)

    def live(self, prediction_id: str) -> LivePrediction | None:
        return self._live.get(prediction_id)

    def event_log(self, prediction_id: str) -> EventLog | None:
        live = self._live.get(prediction_id)
        if live is not None:
            return live.events
        return self._recent.get(prediction_id)

    async def wait(self, prediction_id: str, seconds: float) -> Prediction:
        """The prediction once it has finished, or as it is when `seconds` have passed."""
        live = self._live.get(prediction_id)
        if live is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.done.wait(), seconds)
        prediction = await self.get(prediction_id)
        if prediction is None:
            raise NotFound(f"Prediction {prediction_id} was not found.")
        return prediction

    # -- cancelling -------------------------------------------------------------------------

    async def cancel(self, prediction_id: str, *, reason: str | None = None) -> Prediction | None:
        """Cancel in any state; a finished prediction comes back unchanged.

        `reason` is for cancels the server decides (a deadline): it becomes the error.
        """
        live = self._live.get(prediction_id)
        if live is None:
            return await self.store.get(prediction_id)
        if reason and live.cancel_reason is None:
            live.cancel_reason = reason
            self._on_log(prediction_id, f"{reason}\n")
        if live.runner.remove(live.job):
            await self._finish(live, Status.CANCELED, None)
            return live.prediction
        live.job.cancel_event.set()
        # A running job stops within one decoding step; wait briefly so the answer says so.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), 5)
        return live.prediction

    def _deadline_passed(self, prediction_id: str, seconds: float) -> None:
        reason = f"Canceled: the prediction passed its deadline of {seconds:g} s."
        task = asyncio.get_running_loop().create_task(self.cancel(prediction_id, reason=reason))
        task.add_done_callback(_log_task_error)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what the runner and the model report -----------------------------------------------

    def _on_started(self, prediction_id: str) -> None:
        live = self._live.get(prediction_id)
        if live is None or live.prediction.status is not Status.STARTING:
            return
        live.prediction.transition(Status.PROCESSING)
        live.dirty = True
        self._notify(live.prediction, "start")

    def _on_output(self, prediction_id: str, chunk: Any) -> None:
        live = self._live.get(prediction_id)
        if live is None or live.prediction.status.terminal:
            return
        p = live.prediction
        if live.runner.backend is not None and not live.runner.backend.output_is_iterator:
            p.output = chunk
            count = 1
        else:
            if not isinstance(p.output, list):
                p.output = []
            p.output.append(chunk)
            count = len(p.output)
        live.dirty = True
        text = chunk if isinstance(chunk, str) else str(chunk)
        live.events.append(StreamEvent("output", text, event_id(count, len(p.logs))))
        self._notify(p, "output")

    def _on_log(self, prediction_id: str, text: str) -> None:
        live = self._live.get(prediction_id)
        if live is None or live.prediction.status.terminal or not text:
            return
        p = live.prediction
        p.logs += text
        live.dirty = True
        outputs = len(p.output) if isinstance(p.output, list) else int(p.output is not None)
        live.events.append(StreamEvent("logs", text, event_id(outputs, len(p.logs))))
        self._notify(p, "logs")

    def _on_metrics(self, prediction_id: str, values: dict[str, Any]) -> None:
        live = self._live.get(prediction_id)
        if live is not None:
            live.prediction.metrics.update(values)
            live.dirty = True

    def _on_finished(self, prediction_id: str, outcome: BaseException | None) -> None:
        live = self._live.get(prediction_id)
        if live is None or live.prediction.status.terminal:
            return
        if outcome is not None:
            status, error = Status.FAILED, _error_text(outcome)
        elif live.job.canceled:
            status, error = Status.CANCELED, None
        else:
            status, error = Status.SUCCEEDED, None
        # Events queued by the model thread before it returned are already on the loop's
        # ready queue ahead of this call, so the output is complete here.
        task = asyncio.get_running_loop().create_task(self._finish(live, status, error))
        task.add_done_callback(_log_task_error)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, live: LivePrediction, status: Status, error: str | None) -> None:
        p = live.prediction
        if p.status.terminal:
            return
        if live.deadline_timer is not None:
            live.deadline_timer.cancel()
        if status is Status.CANCELED and live.cancel_reason:
            p.error = live.cancel_reason
        if error is not None:
            p.error = error
            self._on_log(p.id, f"Prediction failed: {error}\n")
        backend = live.runner.backend
        if backend is not None and backend.output_is_iterator and p.output is None:
            p.output = []
        p.transition(status)
        for event in done_events(p):
            live.events.append(event)
        try:
            await self.store.save([p])
        finally:
            self._live.pop(p.id, None)
            self._recent[p.id] = live.events
            if len(self._recent) > 1000:
                self._recent.pop(next(iter(self._recent)))
            live.done.set()
            self._notify(p, "completed")

    def _notify(self, prediction: Prediction, event: str) -> None:
        for listener in self.listeners:
            try:
                listener(prediction, event)
            except Exception:
                log.exception("listener failed on %s of %s", event, prediction.id)

    # -- background work and shutdown -------------------------------------------------------

    async def flush_forever(self) -> None:
        """Write the state of running predictions every `flush_interval` seconds."""
        while True:
            await asyncio.sleep(self._flush_interval)
            await self.flush()

    async def flush(self) -> None:
        dirty = [live for live in self._live.values() if live.dirty]
        for live in dirty:
            live.dirty = False
        try:
            await self.store.save([live.prediction for live in dirty])
        except Exception:
            for live in dirty:
                live.dirty = True
            log.exception("flushing %d predictions failed; will retry", len(dirty))

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, grace: float) -> None:
        """Take no new predictions, give unfinished ones `grace` seconds, cancel the rest.

        Canceled predictions end their streams with a final `done` and are stored, so
        nothing is left half-written for the next start.
        """
        self.stop_accepting()
        unfinished = list(self._live.values())
        if unfinished:
            log.info("waiting up to %g s for %d predictions", grace, len(unfinished))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(live.done.wait() for live in unfinished)), grace
                )
        reason = "Canceled: the server shut down before this prediction finished."
        for live in list(self._live.values()):
            await self.cancel(live.prediction.id, reason=reason)
        await self.flush()

    async def fail_unfinished(self, reason: str) -> None:
        """End every prediction still in memory (shutdown after the runners stopped)."""
        for live in list(self._live.values()):
            await self._finish(live, Status.FAILED, reason)

    @property
    def unfinished(self) -> Sequence[LivePrediction]:
        return list(self._live.values())


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("finishing a prediction failed", exc_info=task.exception())
