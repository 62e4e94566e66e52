#!/usr/bin/env python3
"""Benchmark replicant's event streams: memory per idle connection, and token delivery delay.

Starts the real server in a child process (this script with ``--serve``, on a loopback port,
serving one text model) and measures from this process:

1. **Idle connections.** ``--idle`` streams (default 500) are opened on a prediction that is
   held before its first token, and kept open. Memory per connection is the server's RSS
   (``/proc/PID/status`` VmRSS) after they are all established minus before, divided by
   their count; a few streams are opened and closed first so lazily loaded code does not
   count, and the baseline waits until the server's RSS has stopped growing (a model may
   still be loading after the health check says READY).
2. **Delay from token to reader.** For each reader count in ``--readers`` (default 1 and
   100), predictions of ``--tokens`` tokens run while that many readers follow the stream;
   every reader connects while the prediction is held, then it is released. The server
   child records ``time.monotonic()`` in the model thread as each token leaves the model
   (a wrapper around the sink's ``output``); each reader records ``time.monotonic()`` when
   the bytes of that output event arrive. Both processes read the same CLOCK_MONOTONIC, so
   the difference is the delay through the event loop, the event log, the reader's write,
   loopback TCP and the reader's parsing. The table gives its median and 99th percentile
   over every (token, reader) pair.

The hold (a wrapper around the backend's ``run_batch`` that waits for ``POST
/bench/release`` when the prompt starts with ``[hold]``) and the two wrappers above exist
only in the ``--serve`` child; the server code is unchanged.

Usage::

    python scripts/bench_streams.py [--model tiny|smollm2] [--idle 500] [--readers 1,100]
        [--tokens 200] [--predictions 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

MODEL = "huggingfacetb/smollm2-135m-instruct"
TOKEN = "r8_bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOLD = "[hold]"


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- the server child ---------------------------------------------------------------------


def serve(catalog: Path, data_dir: Path) -> None:
    """Run the app with the bench's instrumentation; print the port, serve until SIGTERM."""
    import attrs

    from models.text_generation import TextGenerationBackend
    from server import predictions
    from server.app import create_app
    from server.config import Config

    released = threading.Event()
    token_times: dict[str, list[float]] = {}

    original_run_batch = TextGenerationBackend.run_batch

    def run_batch(self: Any, jobs: Any, yield_event: Any) -> Any:
        if any(str(job.input.get("prompt", "")).startswith(HOLD) for job in jobs):
            released.wait()
        return original_run_batch(self, jobs, yield_event)

    original_output = predictions._ThreadSink.output

    def output(self: Any, chunk: Any) -> None:
        token_times.setdefault(self._id, []).append(time.monotonic())
        original_output(self, chunk)

    TextGenerationBackend.run_batch = run_batch  # type: ignore[method-assign,assignment]
    predictions._ThreadSink.output = output  # type: ignore[method-assign]

    async def release(request: web.Request) -> web.Response:
        released.set()
        return web.json_response({})

    async def hold(request: web.Request) -> web.Response:
        released.clear()
        return web.json_response({})

    async def times(request: web.Request) -> web.Response:
        return web.json_response(token_times.get(request.match_info["id"], []))

    async def rss(request: web.Request) -> web.Response:
        return web.json_response({"rss_kib": rss_kib(os.getpid())})

    config = Config(
        data_dir=data_dir,
        catalog_path=catalog,
        api_tokens=(TOKEN,),
        stream_ping_interval=15,
    )
    app = create_app(attrs.evolve(config))
    app.router.add_post("/bench/release", release)
    app.router.add_post("/bench/hold", hold)
    app.router.add_get("/bench/times/{id}", times)
    app.router.add_get("/bench/rss", rss)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=2048).start()
        port = runner.addresses[0][1]
        print(f"LISTENING {port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        released.set()
        await runner.cleanup()

    asyncio.run(main())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/PID/status")


# -- the measuring parent -----------------------------------------------------------------


def prepare_weights(model: str, work: Path, weights: Path | None) -> Path:
    if weights is not None:
        return weights
    if model == "tiny":
        sys.path.insert(0, str(_REPO_ROOT / "scripts"))
        from make_tiny_model import build_tiny_model

        out = work / "tiny"
        progress(f"building the tiny model in {out}")
        build_tiny_model(out)
        return out
    prepared = _REPO_ROOT / "data" / "models" / "smollm2-135m-instruct"
    if (prepared / "model.bin").is_file():
        return prepared
    from models.gguf_convert import convert_gguf, find_smollm2_gguf

    out = _REPO_ROOT / ".cache" / "bench" / "smollm2-135m-instruct"
    if not (out / "model.bin").is_file():
        progress(f"converting SmolLM2-135M-Instruct into {out} (about half a minute)")
        convert_gguf(find_smollm2_gguf(), out)
    return out


def write_catalog(work: Path, weights: Path) -> Path:
    catalog = work / "catalog.toml"
    catalog.write_text(
        f"""
[[model]]
name = "{MODEL}"
backend = "ctranslate2"
weights = "{weights}"
schema = "huggingfacetb__smollm2-135m-instruct.json"
[model.settings]
device = "cpu"
"""
    )
    return catalog


class Server:
    """The `--serve` child process."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url

    @classmethod
    async def start(cls, catalog: Path, data_dir: Path) -> Server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            str(catalog),
            str(data_dir),
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        async with asyncio.timeout(120):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("the server child exited before listening")
                if line.startswith("LISTENING "):
                    return cls(process, f"http://127.0.0.1:{int(line.split()[1])}")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def create(http: aiohttp.ClientSession, server: Server, input: dict[str, Any]) -> Any:
    async with http.post(
        f"{server.url}/v1/models/{MODEL}/predictions", json={"input": input}, headers=AUTH
    ) as resp:
        if resp.status != 201:
            raise RuntimeError(f"create failed: {resp.status} {await resp.text()}")
        return await resp.json()


async def post(http: aiohttp.ClientSession, server: Server, path: str) -> None:
    async with http.post(f"{server.url}{path}") as resp:
        resp.raise_for_status()


async def server_rss(http: aiohttp.ClientSession, server: Server) -> int:
    # Read from /proc directly: asking the server would add a request to what is measured.
    return rss_kib(server.process.pid)


async def settled_rss(server: Server) -> int:
    """The server's RSS once it has stopped growing (a model may still be loading spares or
    timing compute types after the health check says READY); bounded at a minute."""
    samples = [rss_kib(server.process.pid)]
    async with asyncio.timeout(60):
        while len(samples) < 5 or max(samples[-5:]) - min(samples[-5:]) > 1024:
            await asyncio.sleep(0.5)
            samples.append(rss_kib(server.process.pid))
    return samples[-1]


async def wait_ready(http: aiohttp.ClientSession, server: Server) -> None:
    async with asyncio.timeout(120):
        while True:
            async with http.get(f"{server.url}/health-check") as resp:
                body = await resp.json()
            if body.get("status") == "READY":
                return
            if body.get("status") in ("SETUP_FAILED", "DEFUNCT", "UNHEALTHY"):
                raise RuntimeError(f"the server did not start: {body}")
            await asyncio.sleep(0.2)  # startup only: the health check has no push form


async def follow(http: aiohttp.ClientSession, url: str, opened: asyncio.Queue[None]) -> list[float]:
    """Read a stream to its end; the arrival time of each output event, in order."""
    arrivals: list[float] = []
    buffer = ""
    async with http.get(url) as resp:
        resp.raise_for_status()
        opened.put_nowait(None)
        async for chunk in resp.content.iter_any():
            now = time.monotonic()
            buffer += chunk.decode()
            *blocks, buffer = buffer.split("\n\n")
            for block in blocks:
                if block.startswith("event: output"):
                    arrivals.append(now)
                elif block.startswith("event: done"):
                    return arrivals
    return arrivals


async def idle_connections(
    http: aiohttp.ClientSession, server: Server, count: int
) -> dict[str, Any]:
    await post(http, server, "/bench/hold")
    held = await create(http, server, {"prompt": f"{HOLD} idle", "max_tokens": 4})
    url = held["urls"]["stream"]
    opened: asyncio.Queue[None] = asyncio.Queue()
    # Warm up: open and close a few streams so code loaded on first use is not counted.
    warm = [asyncio.create_task(follow(http, url, opened)) for _ in range(20)]
    for _ in warm:
        await opened.get()
    for task in warm:
        task.cancel()
    await asyncio.gather(*warm, return_exceptions=True)
    progress("waiting for the server's memory to settle")
    before = await settled_rss(server)
    progress(f"server RSS before: {before} KiB; opening {count} idle streams")
    started = time.monotonic()
    readers = [asyncio.create_task(follow(http, url, opened)) for _ in range(count)]
    for i in range(count):
        await opened.get()
        if (i + 1) % 100 == 0:
            progress(f"  {i + 1}/{count} streams open")
    setup_seconds = time.monotonic() - started
    after = await server_rss(http, server)
    progress(f"server RSS with {count} idle streams: {after} KiB")
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await post(http, server, "/bench/release")
    return {
        "connections": count,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "per_connection_kib": round((after - before) / count, 2),
        "open_seconds": round(setup_seconds, 3),
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def delivery_delay(
    http: aiohttp.ClientSession, server: Server, readers: int, tokens: int, predictions: int
) -> dict[str, Any]:
    delays: list[float] = []
    generation: list[float] = []
    for n in range(predictions):
        await post(http, server, "/bench/hold")
        created = await create(
            http,
            server,
            {
                "prompt": f"{HOLD} Tell me a long story about a fox, part {n}.",
                "max_tokens": tokens,
                "min_tokens": tokens,
            },
        )
        opened: asyncio.Queue[None] = asyncio.Queue()
        tasks = [
            asyncio.create_task(follow(http, created["urls"]["stream"], opened))
            for _ in range(readers)
        ]
        for _ in range(readers):
            await opened.get()
        await post(http, server, "/bench/release")
        arrivals = await asyncio.gather(*tasks)
        async with http.get(f"{server.url}/bench/times/{created['id']}") as resp:
            generated: list[float] = await resp.json()
        for per_reader in arrivals:
            if len(per_reader) != len(generated):
                raise RuntimeError(f"a reader got {len(per_reader)} of {len(generated)} outputs")
            delays += [(a - g) * 1000 for a, g in zip(per_reader, generated, strict=True)]
        if len(generated) > 1:
            generation.append((generated[-1] - generated[0]) / (len(generated) - 1) * 1000)
        progress(
            f"  {readers} reader(s), prediction {n + 1}/{predictions}: {len(generated)} outputs"
        )
    return {
        "readers": readers,
        "samples": len(delays),
        "median_ms": round(statistics.median(delays), 3),
        "p99_ms": round(percentile(delays, 99), 3),
        "max_ms": round(max(delays), 3),
        "ms_per_output_generated": round(statistics.mean(generation), 3) if generation else None,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="replicant-bench-") as tmp:
        work = Path(tmp)
        weights = prepare_weights(args.model, work, args.weights)
        catalog = write_catalog(work, weights)
        progress(f"starting the server ({args.model} model at {weights})")
        server = await Server.start(catalog, work / "data")
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                await wait_ready(http, server)
                progress("server ready")
                idle = await idle_connections(http, server, args.idle)
                delays = []
                for readers in args.readers:
                    progress(f"delivery delay with {readers} reader(s)")
                    delays.append(
                        await delivery_delay(http, server, readers, args.tokens, args.predictions)
                    )
        finally:
            await server.stop()
    return {
        "model": args.model,
        "tokens_per_prediction": args.tokens,
        "predictions_per_reader_count": args.predictions,
        "cpu_count": os.cpu_count(),
        "idle": idle,
        "delivery": delays,
    }


def table(result: dict[str, Any]) -> str:
    idle = result["idle"]
    lines = [
        f"model: {result['model']}, {result['tokens_per_prediction']} tokens x "
        f"{result['predictions_per_reader_count']} predictions per reader count, "
        f"{result['cpu_count']} CPUs",
        "",
        f"{'idle streams':>14} {'RSS before':>12} {'RSS after':>12} {'per stream':>12} "
        f"{'open time':>10}",
        f"{idle['connections']:>14} {idle['rss_before_kib']:>9} KiB {idle['rss_after_kib']:>9} KiB "
        f"{idle['per_connection_kib']:>8} KiB {idle['open_seconds']:>8} s",
        "",
        f"{'readers':>8} {'samples':>8} {'median':>10} {'p99':>10} {'max':>10} {'ms/output':>9}",
    ]
    for row in result["delivery"]:
        lines.append(
            f"{row['readers']:>8} {row['samples']:>8} {row['median_ms']:>7.3f} ms "
            f"{row['p99_ms']:>7.3f} ms {row['max_ms']:>7.3f} ms {row['ms_per_output_generated']:>9}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        serve(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(
        description=(
            "Measure replicant's event streams: server memory per idle stream connection, "
            "and the delay from a token leaving the model to a reader receiving it, with "
            "1 and 100 readers. Starts its own server on a loopback port; progress goes to "
            "stderr, a table to stdout, the figures to a JSON file."
        )
    )
    parser.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: the random test model (fast tokens, a stress case); smollm2: the real "
        "default model, converted once into .cache/bench (default: tiny)",
    )
    parser.add_argument("--weights", type=Path, help="use these model weights instead")
    parser.add_argument(
        "--idle", type=int, default=500, help="idle stream connections to hold (default: 500)"
    )
    parser.add_argument(
        "--readers",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[1, 100],
        help="comma-separated reader counts for the delay measurement (default: 1,100)",
    )
    parser.add_argument(
        "--tokens", type=int, default=200, help="tokens per prediction (default: 200)"
    )
    parser.add_argument(
        "--predictions",
        type=int,
        default=3,
        help="predictions per reader count (default: 3)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("test-artifacts/bench_streams.json"),
        help="where to write the figures (default: test-artifacts/bench_streams.json)",
    )
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args))
    print(table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    progress(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
