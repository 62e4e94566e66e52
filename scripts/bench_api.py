#!/usr/bin/env python3
"""API overhead on loopback, side by side: the bare stack's ceiling, this server, and cog.

Columns, each measured with `wrk` (or, without it, a bounded aiohttp load generator):

  (a) a bare aiohttp handler doing one aiosqlite primary-key lookup, and one doing an INSERT
      and commit: the ceiling of aiohttp + aiosqlite on this disk;
  (b) this server's `GET /v1/predictions/{id}` and `POST /v1/predictions` (tiny model, a
      large queue; refused creates are counted apart);
  (c) synchronous predictions (`Prefer: wait`, max_tokens 1) at 1 and 8 connections, against
      cog 0.16.12's Python server given by --cog-python (a predictor that returns its input).

Progress goes to stderr; the table to stdout, and the figures as JSON with --json.
This script installs nothing: install wrk with `apt-get install wrk`, and cog into a
separate venv with `python -m venv /tmp/cogvenv && /tmp/cogvenv/bin/pip install cog==0.16.12`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import attrs
from aiohttp import web
from benchlib import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "r8_bench-token-0123456789"
MODEL = "huggingfacetb/smollm2-135m-instruct"
BARE_ROWS = 1000
PREDICTOR = """from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def predict(self, prompt: str = Input(default=""), max_tokens: int = Input(default=1)) -> str:
        return prompt
"""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@attrs.frozen
class Result:
    name: str
    connections: int
    rate: float  # answered requests per second
    ok: int  # 2xx answers
    refused: int  # other answers (429, 409, 503, ...)
    seconds: float

    @property
    def ok_rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


@attrs.frozen
class Target:
    method: str
    url: str
    headers: dict[str, str] = attrs.field(factory=dict)
    body: str | None = None


# -- the bare ceiling ------------------------------------------------------------------------


def bare_app(db_path: Path) -> web.Application:
    db_key = web.AppKey("db", aiosqlite.Connection)

    async def db_ctx(app: web.Application) -> Any:
        db = await aiosqlite.connect(db_path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, body TEXT)")
        await db.executemany(
            "INSERT OR IGNORE INTO t VALUES (?, ?)",
            [(f"row{i}", json.dumps({"n": i})) for i in range(BARE_ROWS)],
        )
        await db.commit()
        app[db_key] = db
        yield
        await db.close()

    async def get_row(request: web.Request) -> web.Response:
        db = request.app[db_key]
        async with db.execute("SELECT body FROM t WHERE id = ?", (request.match_info["id"],)) as c:
            row = await c.fetchone()
        if row is None:
            raise web.HTTPNotFound()
        return web.Response(text=row[0], content_type="application/json")

    async def insert_row(request: web.Request) -> web.Response:
        db = request.app[db_key]
        body = await request.read()
        await db.execute("INSERT INTO t VALUES (?, ?)", (os.urandom(10).hex(), body.decode()))
        await db.commit()
        return web.Response(status=201, text="{}", content_type="application/json")

    app = web.Application()
    app.cleanup_ctx.append(db_ctx)
    app.router.add_get("/row/{id}", get_row)
    app.router.add_post("/row", insert_row)
    return app


# -- processes -------------------------------------------------------------------------------


@contextlib.contextmanager
def process(
    args: list[str], url: str, *, cwd: Path, env: dict[str, str], logs: Path
) -> Iterator[None]:
    """Start a server process and wait (at most 120 s) until `url` answers."""
    log = (logs / f"server-{free_port()}.log").open("wb")
    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{args[:3]} exited; see {log.name}")
            if asyncio.run(_answers(url)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args[:3]} did not get ready; see {log.name}")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def _answers(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            body = await r.text()
            return r.status == 200 and "STARTING" not in body and "SETUP" not in body
    except aiohttp.ClientError:
        return False


# -- load generators -------------------------------------------------------------------------

_LUA = """
wrk.method = {method}
wrk.body = {body}
{headers}
"""


def run_wrk(wrk: str, target: Target, connections: int, seconds: float, tmp: Path) -> Result:
    script = tmp / f"bench-{free_port()}.lua"
    headers = "\n".join(
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in target.headers.items()
    )
    script.write_text(
        _LUA.format(
            method=json.dumps(target.method),
            body=json.dumps(target.body) if target.body is not None else "nil",
            headers=headers,
        )
    )
    done = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "70s",
            "-s",
            str(script),
            target.url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    elapsed = re.search(r"requests in ([\d.]+)(m?s|m)\b", out)
    secs = float(elapsed.group(1)) if elapsed else seconds
    if elapsed and elapsed.group(2) == "ms":
        secs /= 1000
    elif elapsed and elapsed.group(2) == "m":
        secs *= 60
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    refused = int(bad.group(1)) if bad else 0
    if errors:
        refused += sum(int(g) for g in errors.groups())
    return Result(
        "", connections, total / secs, total - (int(bad.group(1)) if bad else 0), refused, secs
    )


async def _aiohttp_load(target: Target, connections: int, seconds: float) -> Result:
    statuses: Counter[int] = Counter()
    stop = time.monotonic() + seconds

    async def worker() -> None:
        async with aiohttp.ClientSession(headers=target.headers) as s:
            while time.monotonic() < stop:
                async with s.request(target.method, target.url, data=target.body) as r:
                    await r.read()
                    statuses[r.status] += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    secs = time.monotonic() - start
    ok = sum(n for s, n in statuses.items() if 200 <= s < 300)
    return Result("", connections, statuses.total() / secs, ok, statuses.total() - ok, secs)


def measure(
    name: str, target: Target, connections: int, args: argparse.Namespace, tmp: Path
) -> Result:
    say(f"  {name} at {connections} connection(s) for {args.duration:g} s")
    if args.wrk:
        result = run_wrk(args.wrk, target, connections, args.duration, tmp)
    else:
        result = asyncio.run(_aiohttp_load(target, connections, args.duration))
    return attrs.evolve(result, name=name)


# -- the benchmark ---------------------------------------------------------------------------


def replicant_env(tmp: Path, weights: Path, queue_size: int) -> tuple[list[str], dict[str, str]]:
    catalog = tmp / "catalog.toml"
    catalog.write_text(
        f'[[model]]\nname = "{MODEL}"\nbackend = "ctranslate2"\nweights = "{weights}"\n'
        f'schema = "huggingfacetb__smollm2-135m-instruct.json"\n'
    )
    return (
        [
            "--data-dir",
            str(tmp / "data"),
            "--catalog",
            str(catalog),
            "--queue-size",
            str(queue_size),
        ],
        {"REPLICANT_API_TOKENS": TOKEN},
    )


def bench(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp_name:
        tmp = Path(tmp_name)
        say("(a) bare aiohttp + aiosqlite")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        bare = [py, __file__, "--serve-bare", str(port), "--bare-db", str(tmp / "bare.sqlite3")]
        with process(bare, f"{base}/row/row1", cwd=tmp, env={}, logs=tmp):
            results.append(
                measure(
                    "bare GET (pk lookup)",
                    Target("GET", f"{base}/row/row7"),
                    args.connections,
                    args,
                    tmp,
                )
            )
            results.append(
                measure(
                    "bare POST (insert+commit)",
                    Target("POST", f"{base}/row", body='{"a": 1}'),
                    args.connections,
                    args,
                    tmp,
                )
            )

        say("(b, c) replicant on the tiny model")
        sys.path.insert(0, str(ROOT))
        from tests.conftest import load_script

        weights = tmp / "tiny"
        load_script("make_tiny_model").build_tiny_model(weights)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        flags, env = replicant_env(tmp, weights, args.queue_size)
        auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        create = json.dumps({"version": MODEL, "input": {"prompt": "hi", "max_tokens": 1}})
        serve = [py, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
        with process(serve, f"{base}/health-check", cwd=ROOT, env=env, logs=tmp):
            pid = asyncio.run(_create_one(base, auth, create))
            results.append(
                measure(
                    "replicant GET /v1/predictions/{id}",
                    Target("GET", f"{base}/v1/predictions/{pid}", auth),
                    args.connections,
                    args,
                    tmp,
                )
            )
            results.append(
                measure(
                    "replicant POST /v1/predictions",
                    Target("POST", f"{base}/v1/predictions", auth, create),
                    args.connections,
                    args,
                    tmp,
                )
            )
            wait = {**auth, "Prefer": "wait"}
            for conns in (1, 8):
                results.append(
                    measure(
                        "replicant sync (Prefer: wait)",
                        Target("POST", f"{base}/v1/predictions", wait, create),
                        conns,
                        args,
                        tmp,
                    )
                )

        if args.cog_python is None:
            say("(c) cog: skipped (no --cog-python; install cog==0.16.12 into a separate venv)")
            return results
        say("(c) cog 0.16.12")
        cog_dir = tmp / "cog"
        cog_dir.mkdir()
        (cog_dir / "predict.py").write_text(PREDICTOR)
        (cog_dir / "cog.yaml").write_text('predict: "predict.py:Predictor"\n')
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cog = [args.cog_python, "-m", "cog.server.http", "--host", "127.0.0.1"]
        with process(
            cog,
            f"{base}/health-check",
            cwd=cog_dir,
            env={"PORT": str(port), "COG_LOG_LEVEL": "WARNING"},
            logs=tmp,
        ):
            body = json.dumps({"input": {"prompt": "hi", "max_tokens": 1}})
            for conns in (1, 8):
                results.append(
                    measure(
                        "cog sync POST /predictions",
                        Target(
                            "POST",
                            f"{base}/predictions",
                            {"Content-Type": "application/json"},
                            body,
                        ),
                        conns,
                        args,
                        tmp,
                    )
                )
    return results


async def _create_one(base: str, headers: dict[str, str], body: str) -> str:
    async with (
        aiohttp.ClientSession(headers=headers) as s,
        s.post(f"{base}/v1/predictions", data=body) as r,
    ):
        answer = await r.json()
        if r.status != 201:
            raise RuntimeError(f"create failed: {r.status} {answer}")
        return str(answer["id"])


def verdicts(results: list[Result]) -> list[str]:
    by = {(r.name, r.connections): r for r in results}
    out: list[str] = []

    def pct(a: str, b: str, conns: int) -> None:
        x, y = by.get((a, conns)), by.get((b, conns))
        if x and y:
            share = x.ok_rate / y.ok_rate * 100
            out.append(
                f"{a}: {share:.0f}% of {b} (target >= 50%): {'MET' if share >= 50 else 'MISSED'}"
            )

    conns = next(iter(results)).connections
    pct("replicant GET /v1/predictions/{id}", "bare GET (pk lookup)", conns)
    pct("replicant POST /v1/predictions", "bare POST (insert+commit)", conns)
    for c in (1, 8):
        ours, cog = (
            by.get(("replicant sync (Prefer: wait)", c)),
            by.get(("cog sync POST /predictions", c)),
        )
        if ours and cog:
            met = ours.ok_rate >= cog.ok_rate if c == 1 else ours.ok_rate > cog.ok_rate
            verdict = "MET" if met else "MISSED"
            out.append(
                f"sync at {c} conn: {ours.ok_rate:.0f}/s vs cog {cog.ok_rate:.0f}/s: {verdict}"
            )
        if ours and c == 8:
            verdict = "MET" if ours.refused == 0 else "MISSED"
            out.append(f"sync at 8 conn refused (queue has room): {ours.refused} (0): {verdict}")
    return out


def table(results: list[Result]) -> str:
    head = f"{'measurement':<38} {'conn':>4} {'req/s':>9} {'2xx/s':>9} {'2xx':>7} {'refused':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        rates = f"{r.rate:>9.0f} {r.ok_rate:>9.0f}"
        lines.append(f"{r.name:<38} {r.connections:>4} {rates} {r.ok:>7} {r.refused:>7}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per measurement (default 5)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="connections for the GET/POST columns (default 8)",
    )
    parser.add_argument(
        "--queue-size", type=int, default=100_000, help="replicant's queue (default 100000)"
    )
    parser.add_argument(
        "--cog-python", help="python of a venv with cog==0.16.12 (cog column skipped without)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare-db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        web.run_app(bare_app(args.bare_db), host="127.0.0.1", port=args.serve_bare, print=None)
        return
    args.wrk = shutil.which("wrk")
    if args.wrk is None:
        say(
            "wrk not found (install it with `apt-get install wrk`); "
            "using the aiohttp load generator"
        )
    results = bench(args)
    print(f"load generator: {'wrk' if args.wrk else 'aiohttp'}; {args.duration:g} s per row")
    print(table(results))
    print()
    for line in verdicts(results):
        print(line)
    if args.json:
        args.json.write_text(json.dumps([attrs.asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
