"""Creating ONNX Runtime sessions once, with explicit threads, on the device that really works.

`onnxruntime-gpu` accepts a CUDA provider request on a machine without a usable GPU and
quietly runs on the CPU instead, so the provider a session asked for says nothing. What
counts is `session.get_providers()` after creation, which is what `create_session` reports.
A CUDA failure never stops startup: the session is built again on the CPU and the reason
is kept for `/health-check` and the logs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import onnxruntime as ort  # type: ignore[import-untyped]  # no py.typed

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

#: Builds a session; ort.InferenceSession, or a stand-in in tests of the fallback logic.
SessionFactory = Callable[..., Any]


@attrs.frozen
class SessionSpec:
    """Where and how to run: the catalog's `device`, `threads` and `cuda_device` settings."""

    device: str = "auto"
    #: intra-op threads per session; 0 = every core this process may use.
    threads: int = 0
    cuda_device: int = 0

    def __attrs_post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.threads < 0:
            raise ValueError("threads must be 0 (all cores) or more")


@attrs.frozen(eq=False)
class OpenedSession:
    session: Any
    #: The provider the session really runs on (first of `session.get_providers()`).
    provider: str
    #: Why the session is not on the device that was asked for, if it is not.
    fallback: str | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"


def default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning intra-op threads keep cores busy between calls; the event loop and the other
    # sessions of the model need those cores on a small machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only; the fallback is reported by this module
    return options


def create_session(
    path: Path,
    spec: SessionSpec,
    *,
    threads: int | None = None,
    available: Sequence[str] | None = None,
    factory: SessionFactory = ort.InferenceSession,
) -> OpenedSession:
    """One session for the model file at `path`; CUDA when asked (or auto) and it works."""
    available = list(ort.get_available_providers() if available is None else available)
    count = spec.threads if threads is None else threads
    fallback: str | None = None
    if spec.device in ("auto", "cuda") and CUDA in available:
        try:
            session = factory(
                str(path),
                sess_options=session_options(count),
                providers=[(CUDA, {"device_id": spec.cuda_device}), CPU],
            )
        except Exception as exc:  # a broken CUDA install must not stop a CPU server
            fallback = f"the CUDA execution provider failed ({type(exc).__name__}: {exc})"
            log.warning("%s: %s; using the CPU", path.name, fallback)
        else:
            provider = _first_provider(session)
            if provider != CUDA:
                fallback = (
                    "onnxruntime-gpu is installed but no CUDA device works here "
                    f"(the session runs on {provider})"
                )
                if spec.device == "cuda":
                    log.warning("%s: device = cuda was asked for; %s", path.name, fallback)
            return OpenedSession(session, provider, fallback)
    elif spec.device == "cuda":
        fallback = (
            "device = cuda was asked for, but this onnxruntime build has no CUDA execution "
            "provider (install onnxruntime-gpu)"
        )
        log.warning("%s: %s; using the CPU", path.name, fallback)
    session = factory(str(path), sess_options=session_options(count), providers=[CPU])
    return OpenedSession(session, _first_provider(session), fallback)


def _first_provider(session: Any) -> str:
    providers = list(session.get_providers())
    return str(providers[0]) if providers else CPU
