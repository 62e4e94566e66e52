"""What the benchmarks share: progress output, a free port, and for the text ones the
model and the prompts.

Imported by the scripts/bench_*.py scripts (run from scripts/, so this file is importable
as `benchlib`).
"""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "huggingfacetb/smollm2-135m-instruct"
DEFAULT_MODEL_DIR = ROOT / "data/models/smollm2-135m-instruct"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
#: Requests for long texts, so that greedy decoding runs to the token limit.
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a day in the life of a medieval blacksmith.",
    "Write a detailed travel guide for a weekend in Paris.",
    "Tell me everything you know about the history of the bicycle.",
    "Write a long letter from a sailor to his family back home.",
    "Explain how bread is made, from wheat field to bakery shelf.",
    "Describe the water cycle to a curious ten-year-old, in detail.",
]


def log(message: str) -> None:
    """Progress, on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_default_model(model_dir: Path) -> None:
    """Convert the default model into `model_dir` unless it is there already."""
    if (model_dir / "model.bin").exists():
        return
    log(f"preparing the default model in {model_dir}")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/prepare_default_model.py"), "--out", str(model_dir)],
        check=True,
    )


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is often empty or just the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()
