#!/usr/bin/env python3
"""Webhook delivery under load: many predictions, a receiver that fails half the first tries.

Builds the tiny test model, starts a real `replicant serve` subprocess on loopback with it,
and a webhook receiver in this process (aiohttp, loopback) that answers 500 to every other
new webhook id (the first attempt of half the deliveries) and 200 otherwise, and checks
every signature. Then creates N predictions (max_tokens 1) with a webhook and the default
events filter, and waits until every `completed` webhook has been delivered. Reports:

* completed deliveries (must equal N) and duplicates (the same webhook id answered 2xx
  more than once, or two completed webhook ids for one prediction);
* the delay from `completed_at` to the receiver's 2xx, median / p99 / max, overall and for
  deliveries that needed a retry;
* every webhook request by event, and bad signatures (must be 0).

Prints a table and writes the figures as JSON:

    .venv/bin/python scripts/bench_webhooks.py --json bench-webhooks.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import hmac
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from benchlib import free_port, log  # noqa: E402

MODEL = "huggingfacetb/smollm2-135m-instruct"
TOKEN = "bench-token"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Receiver:
    """Fails the first attempt of every other webhook id; records what it answered 2xx."""

    def __init__(self) -> None:
        self.secret: bytes | None = None
        self.attempts: collections.Counter[str] = collections.Counter()
        self.new_ids = 0
        self.by_event: collections.Counter[str] = collections.Counter()
        self.bad_signatures = 0
        #: webhook id -> times answered 2xx, for completed webhooks.
        self.completed_ok: collections.Counter[str] = collections.Counter()
        #: prediction id -> (webhook id, delay from completed_at, attempts it took).
        self.completed: dict[str, list[tuple[str, float, int]]] = collections.defaultdict(list)
        self.all_done = asyncio.Event()
        self.expected = 0
        self._runner: web.AppRunner | None = None

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _signature_ok(self, request: web.Request, body: bytes) -> bool:
        assert self.secret is not None
        wid = request.headers.get("webhook-id", "")
        ts = request.headers.get("webhook-timestamp", "")
        signed = f"{wid}.{ts}.".encode() + body
        expected = base64.b64encode(hmac.new(self.secret, signed, hashlib.sha256).digest())
        sent = request.headers.get("webhook-signature", "").split()
        return any(hmac.compare_digest(s.encode(), b"v1," + expected) for s in sent)

    async def handle(self, request: web.Request) -> web.Response:
        now = time.time()
        body = await request.read()
        if not self._signature_ok(request, body):
            self.bad_signatures += 1
        wid = request.headers["webhook-id"]
        self.attempts[wid] += 1
        if self.attempts[wid] == 1:
            self.new_ids += 1
            if self.new_ids % 2 == 0:
                return web.Response(status=500, text="failing the first attempt on purpose")
        prediction = json.loads(body)
        status = prediction["status"]
        event = "completed" if status in ("succeeded", "failed", "canceled") else "intermediate"
        self.by_event[event] += 1
        if event == "completed":
            self.completed_ok[wid] += 1
            delay = now - parse_time(prediction["completed_at"])
            self.completed[prediction["id"]].append((wid, delay, self.attempts[wid]))
            if len(self.completed) >= self.expected:
                self.all_done.set()
        return web.Response(text="ok")


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


async def run(args: argparse.Namespace, base: str, receiver: Receiver, hook: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.get(f"{base}/v1/webhooks/default/secret") as resp:
            key = (await resp.json())["key"]
        receiver.secret = base64.b64decode(key.split("_", 1)[1])
        receiver.expected = args.predictions
        limit = asyncio.Semaphore(args.concurrency)
        created: list[str] = []

        async def create() -> None:
            body: dict[str, Any] = {"input": {"prompt": "hi", "max_tokens": 1}, "webhook": hook}
            if args.events:
                body["webhook_events_filter"] = args.events.split(",")
            async with limit:
                for _ in range(100):  # bounded retries on 429
                    async with session.post(
                        f"{base}/v1/models/{MODEL}/predictions", json=body
                    ) as resp:
                        if resp.status == 429:
                            await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                            continue
                        resp.raise_for_status()
                        created.append((await resp.json())["id"])
                        return
                raise RuntimeError("create kept getting 429")

        async def progress() -> None:
            while True:
                await asyncio.sleep(1)
                log(
                    f"created {len(created)}/{args.predictions}, completed webhooks delivered "
                    f"{len(receiver.completed)}/{args.predictions}, requests {receiver.new_ids} "
                    f"new ids, {sum(receiver.attempts.values())} attempts"
                )

        reporter = asyncio.create_task(progress())
        start = time.perf_counter()
        try:
            await asyncio.gather(*(create() for _ in range(args.predictions)))
            create_s = time.perf_counter() - start
            log(f"created {len(created)} predictions in {create_s:.1f} s")
            try:
                async with asyncio.timeout(args.timeout):
                    await receiver.all_done.wait()
            except TimeoutError:
                log(f"gave up waiting after {args.timeout} s")
            total_s = time.perf_counter() - start
            # Keep listening a little, so a duplicate sent late would still be counted.
            await asyncio.sleep(args.settle)
        finally:
            reporter.cancel()
        states = {}
        for status in ("pending", "delivered", "failed"):
            async with session.get(
                f"{base}/v1/webhooks/deliveries", params={"status": status, "limit": "100"}
            ) as resp:
                listing = await resp.json()
            states[status] = len(listing["results"]) if listing["next"] is None else "100+"

    delays = [d for deliveries in receiver.completed.values() for _, d, _ in deliveries[:1]]
    retried = [
        d for deliveries in receiver.completed.values() for _, d, a in deliveries[:1] if a > 1
    ]
    first_try = [
        d for deliveries in receiver.completed.values() for _, d, a in deliveries[:1] if a == 1
    ]
    duplicates = sum(n - 1 for n in receiver.completed_ok.values()) + sum(
        len({w for w, _, _ in deliveries}) - 1 for deliveries in receiver.completed.values()
    )

    def summary(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"count": 0, "median_ms": None, "p99_ms": None, "max_ms": None}
        return {
            "count": len(values),
            "median_ms": statistics.median(values) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000,
            "max_ms": max(values) * 1000,
        }

    return {
        "predictions": args.predictions,
        "created": len(created),
        "completed_delivered": len(receiver.completed),
        "duplicates": duplicates,
        "bad_signatures": receiver.bad_signatures,
        "requests": sum(receiver.attempts.values()),
        "webhook_ids": len(receiver.attempts),
        "first_attempts_failed_on_purpose": receiver.new_ids // 2,
        "delivered_by_event": dict(receiver.by_event),
        "delay_completed_to_delivered": summary(delays),
        "delay_first_try": summary(first_try),
        "delay_after_retry": summary(retried),
        "create_seconds": create_s,
        "total_seconds": total_s,
        "outbox_rows_by_status": states,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--predictions", type=int, default=1000, help="predictions to create")
    parser.add_argument("--concurrency", type=int, default=32, help="creates in flight at once")
    parser.add_argument(
        "--events",
        default="",
        help="webhook_events_filter, comma-separated; empty: the default (all four events)",
    )
    parser.add_argument(
        "--retry-delay",
        type=float,
        default=1.0,
        help="the server's --webhook-retry-delay (first retry after about this long)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="longest wait for all deliveries, seconds"
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds to keep listening for duplicates"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "tiny"
        log("building the tiny model")
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(weights)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        catalog = Path(tmp) / "catalog.toml"
        catalog.write_text(
            f'[[model]]\nname = "{MODEL}"\nbackend = "ctranslate2"\nweights = "{weights}"\n'
            'schema = "huggingfacetb__smollm2-135m-instruct.json"\n'
            "[model.settings]\nmax_batch_size = 8\nseeded_spare = false\n"
        )
        port, hook_port = free_port(), free_port()
        env = {**os.environ, "REPLICANT_API_TOKENS": TOKEN}
        log(f"starting the server on port {port}, the receiver on {hook_port}")
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
                "--queue-size",
                str(args.predictions + 64),
                "--webhook-retry-delay",
                str(args.retry_delay),
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"

            async def bench() -> dict[str, Any]:
                receiver = Receiver()
                await receiver.start(hook_port)
                try:
                    await wait_ready(base)
                    return await run(args, base, receiver, f"http://127.0.0.1:{hook_port}/hook")
                finally:
                    await receiver.stop()

            figures = asyncio.run(bench())
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    figures["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    figures["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    figures["settings"] = {
        "events": args.events or "default (start, output, logs, completed)",
        "max_tokens": 1,
        "retry_delay": args.retry_delay,
        "receiver": "500 on the first attempt of every other webhook id",
    }

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [
        (
            "completed webhooks delivered",
            f"{figures['completed_delivered']}",
            f"= {args.predictions}",
        ),
        ("duplicates", f"{figures['duplicates']}", "= 0"),
        ("bad signatures", f"{figures['bad_signatures']}", "= 0"),
        ("webhook requests (all attempts)", f"{figures['requests']}", ""),
        ("first attempts failed on purpose", f"{figures['first_attempts_failed_on_purpose']}", ""),
    ]
    for label, key in (
        ("delay, all completed", "delay_completed_to_delivered"),
        ("delay, first try", "delay_first_try"),
        ("delay, after a retry", "delay_after_retry"),
    ):
        s = figures[key]
        rows.append(
            (
                f"{label} (n={s['count']}): median / p99 / max ms",
                f"{ms(s['median_ms'])} / {ms(s['p99_ms'])} / {ms(s['max_ms'])}",
                "",
            )
        )
    rows.append(("wall time, create to last delivery (s)", f"{figures['total_seconds']:.1f}", ""))
    print(f"{'':52} {'measured':>26} {'target':>10}")
    for label, value, target in rows:
        print(f"{label:52} {value:>26} {target:>10}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        log(f"wrote {args.json}")
    ok = figures["completed_delivered"] == args.predictions and figures["duplicates"] == 0
    return 0 if ok and figures["bad_signatures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
