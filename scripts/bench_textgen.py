#!/usr/bin/env python3
"""Text generation through the server versus raw CTranslate2, measured in one run.

Same model, same prompts, same settings (greedy, max_tokens), done
(a) with raw CTranslate2 in this process, and
(b) through a real `replicant serve` subprocess over HTTP, streaming with SSE,
taking turns (raw, then server, prompt by prompt) so that drift in the machine's speed
during the run hits both alike:

* single stream: tokens/s and time to first token (median over the prompts);
* N concurrent streams: total tokens/s, against raw `generate_batch` at batch N;
* peak RSS of the server with the model loaded.

Prints a table and writes the figures as JSON. Run on a quiet machine:

    .venv/bin/python scripts/bench_textgen.py --json bench-textgen.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import ctranslate2  # noqa: E402
import tokenizers  # noqa: E402
from benchlib import (  # noqa: E402
    DEFAULT_MODEL_DIR,
    MODEL,
    PROMPTS,
    SYSTEM,
    cpu_name,
    ensure_default_model,
    free_port,
    log,
)

from models.prompts import CHAT_TEMPLATES, render  # noqa: E402

#: Pause between a raw run and a server run: the engine's worker threads may spin for a
#: while after a call, and would steal the other side's cores.
SETTLE = 0.5


def prompt_tokens(tokenizer: tokenizers.Tokenizer, prompt: str) -> list[str]:
    text = render(CHAT_TEMPLATES["chatml"], prompt=prompt, system_prompt=SYSTEM)
    return list(tokenizer.encode(text).tokens)


def raw_single(generator: Any, tokens: list[str], max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, tokens/s after it, tokens) for one greedy stream."""
    start = time.perf_counter()
    first = None
    count = 0
    for _ in generator.generate_tokens(
        tokens, max_length=max_tokens, sampling_topk=1, end_token="<|im_end|>"
    ):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return first - start, (count - 1) / (end - first) if end > first else 0.0, count


def raw_batch(generator: Any, batch: list[list[str]], max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    results = generator.generate_batch(
        batch,
        max_length=max_tokens,
        sampling_topk=1,
        end_token="<|im_end|>",
        include_prompt_in_result=False,
    )
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.sequences_ids[0]) for r in results)
    return tokens / elapsed, tokens


async def stream_one(
    session: aiohttp.ClientSession, base: str, prompt: str, max_tokens: int
) -> dict[str, float]:
    """Create with the API, read urls.stream; times from just before the create."""
    start = time.perf_counter()
    async with session.post(
        f"{base}/v1/models/{MODEL}/predictions",
        json={"input": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}},
    ) as resp:
        created = await resp.json()
    first = None
    outputs = 0
    async with session.get(
        created["urls"]["stream"], headers={"Accept": "text/event-stream"}
    ) as resp:
        event = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line == "" and event:
                if event == "output":
                    outputs += 1
                    if first is None:
                        first = time.perf_counter()
                if event == "done":
                    break
                event = ""
    end = time.perf_counter()
    async with session.get(created["urls"]["get"]) as resp:
        final = await resp.json()
    tokens = int(final["metrics"]["output_token_count"])
    assert first is not None, final
    return {
        "ttft": first - start,
        "tokens": tokens,
        "tps": (tokens - 1) / (end - first) if end > first else 0.0,
        "start": start,
        "end": end,
    }


async def interleaved_runs(
    base: str, token: str, generator: Any, tokenizer: tokenizers.Tokenizer, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Raw and server figures, measured turn about so that drift in the machine's speed
    (shared machines drift by tens of percent within minutes) hits both alike."""
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=600)
    raw_singles: list[tuple[float, float, int]] = []
    singles: list[dict[str, float]] = []
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        raw_single(generator, prompt_tokens(tokenizer, PROMPTS[0]), 8)  # warm-up
        await stream_one(session, base, PROMPTS[0], 8)
        for i, prompt in enumerate(PROMPTS[: args.prompts]):
            log(f"single stream {i + 1}/{args.prompts}: raw, then server")
            tokens = prompt_tokens(tokenizer, prompt)
            raw_singles.append(raw_single(generator, tokens, args.max_tokens))
            await asyncio.sleep(SETTLE)
            singles.append(await stream_one(session, base, prompt, args.max_tokens))
            await asyncio.sleep(SETTLE)
        log(f"{args.concurrency} streams: raw generate_batch, then the server")
        batch_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
        raw_batch_tps, _ = raw_batch(
            generator, [prompt_tokens(tokenizer, p) for p in batch_prompts], args.max_tokens
        )
        await asyncio.sleep(SETTLE)
        start = time.perf_counter()
        many = await asyncio.gather(
            *(stream_one(session, base, p, args.max_tokens) for p in batch_prompts)
        )
        wall = time.perf_counter() - start
    raw = {
        "single_ttft_s": statistics.median(r[0] for r in raw_singles),
        "single_tps": statistics.median(r[1] for r in raw_singles),
        "batch_tps": raw_batch_tps,
    }
    server = {
        "single_ttft_s": statistics.median(s["ttft"] for s in singles),
        "single_tps": statistics.median(s["tps"] for s in singles),
        "concurrent_tps": sum(m["tokens"] for m in many) / wall,
        "concurrent_tokens": sum(m["tokens"] for m in many),
    }
    return raw, server


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="CTranslate2 model directory (prepared if missing)",
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per generation")
    parser.add_argument("--prompts", type=int, default=5, help="single-stream runs (median)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent streams")
    parser.add_argument("--threads", type=int, default=0, help="intra threads (0 = all cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    ensure_default_model(args.model_dir)
    threads = args.threads or len(os.sched_getaffinity(0))
    tokenizer = tokenizers.Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))

    log("raw CTranslate2: loading")
    generator = ctranslate2.Generator(
        str(args.model_dir), device="cpu", compute_type="float32", intra_threads=threads
    )

    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog.toml"
        catalog.write_text(
            f'[[model]]\nname = "{MODEL}"\nbackend = "ctranslate2"\n'
            f'weights = "{args.model_dir.resolve()}"\n'
            'schema = "huggingfacetb__smollm2-135m-instruct.json"\n'
            f"[model.settings]\nthreads = {threads}\nmax_batch_size = {args.concurrency}\n"
            "seeded_spare = false\n"
        )
        port = free_port()
        token = "bench-token"
        env = {**os.environ, "REPLICANT_API_TOKENS": token}
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
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(wait_ready(base))
            raw, server = asyncio.run(interleaved_runs(base, token, generator, tokenizer, args))
            server["peak_rss_mib"] = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    figures = {
        "machine": {
            "cpu": cpu_name(),
            "cores": threads,
            "python": platform.python_version(),
            "ctranslate2": ctranslate2.__version__,
        },
        "settings": {
            "max_tokens": args.max_tokens,
            "prompts": args.prompts,
            "concurrency": args.concurrency,
            "compute_type": "float32",
            "greedy": True,
        },
        "raw": raw,
        "server": server,
        "ratios": {
            "single_tps_server_over_raw": server["single_tps"] / raw["single_tps"],
            "ttft_added_ms": (server["single_ttft_s"] - raw["single_ttft_s"]) * 1000,
            "concurrent_server_over_raw_batch": server["concurrent_tps"] / raw["batch_tps"],
            "concurrent_over_server_single": server["concurrent_tps"] / server["single_tps"],
        },
    }
    r, s, q = raw, server, figures["ratios"]
    rows = [
        (
            "single stream tokens/s",
            f"{r['single_tps']:.1f}",
            f"{s['single_tps']:.1f}",
            f"{q['single_tps_server_over_raw']:.1%}",
            ">= 95%",
        ),
        (
            "time to first token (ms)",
            f"{r['single_ttft_s'] * 1000:.1f}",
            f"{s['single_ttft_s'] * 1000:.1f}",
            f"+{q['ttft_added_ms']:.1f} ms",
            "<= +15 ms",
        ),
        (
            f"{args.concurrency} streams, total tokens/s",
            f"{r['batch_tps']:.1f}",
            f"{s['concurrent_tps']:.1f}",
            f"{q['concurrent_server_over_raw_batch']:.1%}",
            ">= 85%",
        ),
        (
            f"{args.concurrency} streams / server single",
            "",
            "",
            f"{q['concurrent_over_server_single']:.2f}x",
            ">= 3x",
        ),
        ("server peak RSS (MiB)", "", f"{s['peak_rss_mib']:.0f}", "", ""),
    ]
    print(f"{'':34} {'raw CT2':>10} {'server':>10} {'ratio':>12} {'target':>10}")
    for row in rows:
        print(f"{row[0]:34} {row[1]:>10} {row[2]:>10} {row[3]:>12} {row[4]:>10}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


async def wait_ready(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            try:
                async with session.get(f"{base}/health-check") as resp:
                    if (await resp.json())["status"] == "READY":
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the server did not become ready in 60 s")


if __name__ == "__main__":
    raise SystemExit(main())
