"""The interface between the server and a model backend.

A backend knows nothing of HTTP or predictions: it loads weights, checks an input beyond what
the JSON Schema can say, and runs jobs on an executor thread, reporting through each job's
`Sink`. The server side of the sink carries events back to the event loop.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

import attrs


class ModelInputError(Exception):
    """An input the schema allows but the model cannot take (rendered as a 422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Sink(Protocol):
    """Where a running job reports; every method is safe to call from any thread."""

    def output(self, chunk: Any) -> None:
        """Append one output item (a text chunk for iterator outputs) or set a single output."""

    def log(self, text: str) -> None:
        """Append text to the prediction's logs (include the trailing newline)."""

    def metrics(self, values: Mapping[str, float | int]) -> None:
        """Merge values into the prediction's metrics."""


@attrs.define(kw_only=True)
class Job:
    """One prediction as a backend sees it: a complete, validated input and a way to report."""

    input: Mapping[str, Any]
    #: The input fields the caller sent (the others hold schema defaults).
    provided: frozenset[str]
    sink: Sink
    cancel_event: threading.Event = attrs.field(factory=threading.Event)
    #: The backend's own state of a job it paused (see `Paused`); None before the first run.
    state: Any = None

    @property
    def canceled(self) -> bool:
        return self.cancel_event.is_set()


class Paused(Exception):
    """Outcome of a job a backend paused so a bigger batch can form; it resumes later.

    A backend returns it (not raises) from `run_batch` for a job it stopped early when the
    runner's `yield_event` was set; the job keeps its progress in `Job.state`.
    """


#: One outcome per job: None (finished), Paused, or the exception that failed it.
Outcome = BaseException | None


@attrs.frozen
class LoadInfo:
    """What loading found out, for `/health-check` and the startup banner."""

    device: str
    detail: str = ""


class Backend(abc.ABC):
    """A loaded model that runs jobs. Subclasses: `models.text_generation.TextGenerationBackend`."""

    #: True when the output is a list of chunks that grows (`x-cog-array-type: iterator`).
    output_is_iterator: bool = True
    #: Most jobs `run_batch` accepts at once.
    max_batch_size: int = 1
    #: Seconds the runner waits for more jobs before starting a batch that is not full.
    batch_window: float = 0.0

    @abc.abstractmethod
    def load(self) -> LoadInfo:
        """Load weights. Blocking; runs on the executor."""

    def check_input(  # noqa: B027 - optional hook
        self, values: Mapping[str, Any], provided: frozenset[str]
    ) -> None:
        """Raise ModelInputError for inputs the schema cannot rule out. Blocking but short."""

    def batch_key(self, values: Mapping[str, Any], provided: frozenset[str]) -> Hashable | None:
        """Jobs with equal non-None keys may run in one batch; None means run alone."""
        return None

    @abc.abstractmethod
    def run_batch(self, jobs: Sequence[Job], yield_event: threading.Event) -> Sequence[Outcome]:
        """Run jobs on this thread; one outcome per job (None = finished).

        A job whose `cancel_event` is set should stop within one step; its outcome is then
        None and the server marks it canceled. An exception for one job fails that job only.
        When `yield_event` is set, more jobs are waiting that could join this batch: a backend
        that can resume jobs may stop early and return `Paused()` for the unfinished ones.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the weights."""
