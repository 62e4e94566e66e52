"""Choosing where a model runs: CUDA when a device really works, else the CPU."""

from __future__ import annotations

import logging
import os

import ctranslate2

log = logging.getLogger(__name__)

#: Measured on this project's 2-core CPU box with SmolLM2-135M (scripts/bench_textgen.py):
#: float32 decodes faster than int8 there. On CUDA, float16 is the usual best.
DEFAULT_COMPUTE_TYPE = {"cpu": "float32", "cuda": "float16"}


def cuda_devices() -> int:
    try:
        return int(ctranslate2.get_cuda_device_count())
    except Exception:  # a broken CUDA install must not stop a CPU server
        log.exception("could not count CUDA devices; using the CPU")
        return 0


def pick_device(setting: str) -> str:
    """`auto` and `cuda` give CUDA only when a device is there; otherwise the CPU."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {setting!r}")
    if setting == "cpu":
        return "cpu"
    if cuda_devices() > 0:
        return "cuda"
    if setting == "cuda":
        log.warning("device = cuda was asked for, but no CUDA device works here; using the CPU")
    return "cpu"


def pick_compute_type(setting: str, device: str) -> str:
    if setting != "auto":
        supported = ctranslate2.get_supported_compute_types(device)
        if setting not in supported:
            raise ValueError(
                f"compute_type {setting} is not supported on {device} "
                f"(supported: {', '.join(sorted(supported))})"
            )
        return setting
    return DEFAULT_COMPUTE_TYPE[device]


def default_threads() -> int:
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
