#!/usr/bin/env python3
"""Vision-language throughput: the server against raw ONNX Runtime, measured in one run.

On the same weights (by default the tiny random VLM, built into a temporary directory) and
the same thread settings:

* images per second through the vision encoder alone (pixel values ready), through
  decode + preprocess + encode in this process, and through a real `replicant serve`
  subprocess over HTTP (a llava prediction with `max_tokens: 0` and the image as a data:
  URI: create, validate, decode, preprocess, encode, store), one at a time and N at once;
* output tokens per second of raw decoder calls (embed + decoder with KV cache + argmax,
  nothing else), of the backend's numpy loop (greedy, sampled, 3-beam search; with
  detokenizing and the sink), measured after the prompt is read.

Prints a table and writes the figures as JSON. Run on a quiet machine:

    .venv/bin/python scripts/bench_vision.py --json bench-vision.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # type: ignore[import-untyped]  # noqa: E402  # no py.typed
from benchlib import free_port, log  # noqa: E402
from PIL import Image  # noqa: E402

from models.base import Job  # noqa: E402
from models.images import ImageLimits, decode_image, preprocess  # noqa: E402
from models.onnx_sessions import default_threads  # noqa: E402
from models.vision_language import VisionLanguageBackend, VisionSettings  # noqa: E402

MODEL = "yorickvp/llava-v1.6-34b"
PROMPT = "Describe this image in detail."


def photo(width: int, height: int) -> bytes:
    """A JPEG with photo-like content (smooth gradients plus noise), as a camera sends."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class Sink:
    def __init__(self) -> None:
        self.values: dict[str, float | int] = {}
        self.chunks = 0

    def output(self, chunk: Any) -> None:
        self.chunks += 1

    def log(self, text: str) -> None:
        pass

    def metrics(self, values: Mapping[str, float | int]) -> None:
        self.values.update(values)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def bench_encoder(backend: VisionLanguageBackend, image: bytes, count: int) -> dict[str, float]:
    vlm = backend.vlm
    decoded = decode_image(image, ImageLimits(), source="bench")
    pixels = preprocess(decoded.image, backend.config.image)
    vlm.encode_image(pixels)  # warm-up
    start = time.perf_counter()
    for _ in range(count):
        vlm.encode_image(pixels)
    encoder_only = rate(count, time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(count):
        fresh = decode_image(image, ImageLimits(), source="bench")
        vlm.encode_image(preprocess(fresh.image, backend.config.image))
    full = rate(count, time.perf_counter() - start)
    return {"encoder_only_ips": encoder_only, "decode_preprocess_encode_ips": full}


def raw_decode(backend: VisionLanguageBackend, image: bytes, steps: int) -> float:
    """Tokens/s of bare decoder calls: embed one token, run the decoder, argmax, repeat."""
    vlm = backend.vlm
    decoded = decode_image(image, ImageLimits(), source="bench")
    features = vlm.encode_image(preprocess(decoded.image, backend.config.image))
    request = backend.request({"prompt": PROMPT, "image": decoded}, frozenset({"prompt", "image"}))
    ids = backend.prompt_ids(request)
    embeds = vlm.prompt_embeddings(ids, backend.image_token_id, features)
    io_ = vlm.io
    names = [io_.logits, *(present for _, present in io_.cache)]
    decoder, embedder = vlm.decoder.session, vlm.embedder.session
    feed: dict[str, Any] = {io_.embeds: embeds}
    length = embeds.shape[1]
    for past, _ in io_.cache:
        feed[past] = np.zeros((1, io_.kv_heads, 0, io_.head_dim), io_.cache_type)
    if io_.attention_mask:
        feed[io_.attention_mask] = np.ones((1, length), np.int64)
    if io_.position_ids:
        feed[io_.position_ids] = np.arange(length, dtype=np.int64)[None]
    logits, *presents = decoder.run(names, feed)
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(logits[0, -1]))
        (row,) = embedder.run(None, {"input_ids": np.array([[token]], dtype=np.int64)})
        feed = {io_.embeds: row}
        for (past, _), present in zip(io_.cache, presents, strict=True):
            feed[past] = present
        if io_.attention_mask:
            feed[io_.attention_mask] = np.ones((1, length + 1), np.int64)
        if io_.position_ids:
            feed[io_.position_ids] = np.array([[length]], dtype=np.int64)
        logits, *presents = decoder.run(names, feed)
        length += 1
    return rate(steps, time.perf_counter() - start)


def loop_decode(
    backend: VisionLanguageBackend, image: bytes, inputs: dict[str, Any], runs: int
) -> tuple[float, int]:
    """(median output tokens/s after the prompt, tokens of the last run) of the backend."""
    speeds, tokens = [], 0
    for _ in range(runs):
        sink = Sink()
        values = {"prompt": PROMPT, "image": decode_image(image, ImageLimits(), source="b")}
        values |= inputs
        job = Job(input=values, provided=frozenset(values), sink=sink)
        (outcome,) = backend.run_batch([job], threading.Event())
        assert outcome is None, outcome
        speeds.append(float(sink.values["tokens_per_second"]))
        tokens = int(sink.values["output_token_count"])
    return statistics.median(speeds), tokens


async def wait_ready(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            try:
                async with session.get(f"{base}/health-check") as resp:
                    body = await resp.json()
                    if body["status"] in ("READY", "BUSY"):
                        return
                    if body["status"] == "SETUP_FAILED":
                        raise RuntimeError(f"the server could not load the model: {body}")
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the server did not become ready in 60 s")


async def server_images(
    base: str, token: str, image: bytes, count: int, concurrency: int
) -> dict[str, float]:
    uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    body = {"input": {"prompt": PROMPT, "image": uri, "max_tokens": 0}}
    headers = {"Authorization": f"Bearer {token}", "Prefer": "wait=60"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:

        async def one() -> float:
            async with session.post(f"{base}/v1/models/{MODEL}/predictions", json=body) as resp:
                result = await resp.json()
            if result.get("status") != "succeeded":
                raise RuntimeError(f"prediction failed: {result}")
            return float(result["metrics"]["image_encode_time"])

        await one()  # warm-up
        start = time.perf_counter()
        encode_times = [await one() for _ in range(count)]
        sequential = rate(count, time.perf_counter() - start)
        log(f"server: {count} images, {concurrency} at a time")
        start = time.perf_counter()
        for first in range(0, count, concurrency):
            await asyncio.gather(*(one() for _ in range(min(concurrency, count - first))))
        concurrent = rate(count, time.perf_counter() - start)
    return {
        "sequential_ips": sequential,
        "concurrent_ips": concurrent,
        "in_server_preprocess_encode_ms": statistics.median(encode_times) * 1000,
    }


def run_server(
    weights: Path, threads: int, image: bytes, count: int, concurrency: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog.toml"
        catalog.write_text(
            f'[[model]]\nname = "{MODEL}"\nbackend = "onnxruntime"\n'
            f'weights = "{weights.resolve()}"\nschema = "yorickvp__llava-v1.6-34b.json"\n'
            f"[model.settings]\nthreads = {threads}\n"
        )
        port, token = free_port(), "bench-token"
        log(f"starting the server on port {port}")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(Path(tmp) / "data"),
                "--catalog",
                str(catalog),
                "--log-level",
                "warning",
            ],
            env={**os.environ, "REPLICANT_API_TOKENS": token},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(wait_ready(base))
            log(f"server: {count} images, one at a time")
            return asyncio.run(server_images(base, token, image, count, concurrency))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def table(figures: dict[str, Any]) -> str:
    images, tokens = figures["images"], figures["tokens"]
    rows = [
        ("images/s", "vision encoder alone (ready pixels)", images["encoder_only_ips"]),
        (
            "images/s",
            "decode + preprocess + encode, in process",
            images["decode_preprocess_encode_ips"],
        ),
        ("images/s", "server over HTTP, one at a time", images["sequential_ips"]),
        (
            "images/s",
            f"server over HTTP, {figures['settings']['concurrency']} at once",
            images["concurrent_ips"],
        ),
        ("tokens/s", "raw decoder calls (embed + decoder + argmax)", tokens["raw_tps"]),
        ("tokens/s", "numpy loop, greedy", tokens["greedy_tps"]),
        ("tokens/s", "numpy loop, sampled (t=0.7, top_p=0.9)", tokens["sampled_tps"]),
        ("tokens/s", "numpy loop, beam search (3 beams)", tokens["beam3_tps"]),
    ]
    lines = [f"{'unit':<9} {'path':<48} {'rate':>10}", "-" * 69]
    lines += [f"{unit:<9} {name:<48} {value:>10.1f}" for unit, name, value in rows]
    lines += [
        "",
        f"server time in preprocess + encode per image: "
        f"{images['in_server_preprocess_encode_ms']:.2f} ms (median)",
        f"numpy loop greedy / raw decoder: {tokens['greedy_tps'] / tokens['raw_tps']:.2f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="a weights directory in the layout of docs/vision.md (llava prompt format); "
        "default: the tiny random model, built into a temporary directory",
    )
    parser.add_argument("--images", type=int, default=200, help="images per images/s figure")
    parser.add_argument("--image-size", default="640x480", help="test photo size, WxH")
    parser.add_argument("--concurrency", type=int, default=4, help="server requests at once")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    parser.add_argument("--runs", type=int, default=3, help="generations per loop figure")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = all cores)")
    parser.add_argument("--skip-server", action="store_true", help="in-process figures only")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    threads = args.threads or default_threads()
    image = photo(width, height)

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            sys.path.insert(0, str(ROOT / "scripts"))
            from make_tiny_vlm import build_tiny_vlm

            weights = build_tiny_vlm(Path(tmp) / "tiny-llava", flavor="llava")
            log(f"built the tiny VLM in {weights}")
        backend = VisionLanguageBackend(
            weights, VisionSettings(threads=threads), output_is_iterator=True
        )
        info = backend.load()
        log(f"loaded {weights.name}: {info.device}, {info.detail}")

        log(f"vision encoder: {args.images} images")
        images = bench_encoder(backend, image, args.images)

        log(f"numpy loop: {args.runs} x {args.tokens} tokens, greedy")
        greedy, steps = loop_decode(
            backend, image, {"temperature": 0, "max_tokens": args.tokens}, args.runs
        )
        log(f"raw decoder calls: {steps} tokens")
        raw = statistics.median(raw_decode(backend, image, steps) for _ in range(args.runs))
        log("numpy loop: sampled")
        sampled, _ = loop_decode(
            backend, image, {"temperature": 0.7, "top_p": 0.9, "max_tokens": args.tokens}, args.runs
        )
        log("numpy loop: beam search")
        beam, _ = loop_decode(
            backend, image, {"num_beams": 3, "max_tokens": args.tokens}, args.runs
        )
        positions = backend.vlm.image_positions
        backend.close()

        if args.skip_server:
            images |= {
                "sequential_ips": 0.0,
                "concurrent_ips": 0.0,
                "in_server_preprocess_encode_ms": 0.0,
            }
        else:
            images |= run_server(weights, threads, image, args.images, args.concurrency)

    figures = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": threads,
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "device": info.device,
        },
        "settings": {
            "weights": str(args.weights or "tiny random VLM (scripts/make_tiny_vlm.py)"),
            "image": f"{width}x{height} JPEG ({len(image)} bytes)",
            "image_positions": positions,
            "images": args.images,
            "concurrency": args.concurrency,
            "tokens": args.tokens,
            "greedy_tokens_generated": steps,
            "runs": args.runs,
        },
        "images": images,
        "tokens": {
            "raw_tps": raw,
            "greedy_tps": greedy,
            "sampled_tps": sampled,
            "beam3_tps": beam,
        },
    }
    print(table(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
