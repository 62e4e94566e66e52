#!/usr/bin/env python3
"""This server against llama.cpp on the same model, with raw CTranslate2 as the ceiling.

One run measures, at each concurrency level (default 1, 2, 4, 8 clients):

* raw CTranslate2 in this process on the converted model (`generate_tokens` for one
  client, `generate_batch` for several): the ceiling of the engine this server runs;
* this server (`replicant serve` subprocess) over HTTP, each client creating a prediction
  and reading its `urls.stream` with SSE;
* llama.cpp through llama-cpp-python's OpenAI-compatible server, streaming
  `/v1/completions`, on the GGUF file the default model is converted from
  (SmolLM2-135M-Instruct.Q4_1.gguf).

Every system gets the same rendered ChatML prompts (requests for long texts), greedy
decoding and `--max-tokens`; the table shows the new tokens each system really made per
request, so a system that stops early gains nothing. `--force-length` suppresses
end-of-text so every request makes exactly `--max-tokens` (`min_tokens` here, `min_length`
in CTranslate2, a logit bias in llama.cpp); note that this server does not let a new
request join a running batch whose requests set `min_tokens` (see docs/performance.md), so
that mode measures batches formed at arrival only. Each client sends `--rounds` requests
one after another; every request's system prompt starts with its own number, so llama.cpp's reuse of
the previous request's prefix cannot make a first token free. llama-cpp-python's server
runs one request at a time behind a lock, and by default a waiting request interrupts the
running one, so it runs with `--interrupt_requests False`.

llama-cpp-python compiles llama.cpp from source (several minutes on two cores): the first
run builds it once into .cache/llama-cpp-python-VERSION/ and says so; later runs reuse it.

    .venv/bin/python scripts/bench_llamacpp.py --json bench-llamacpp.json --plots docs/img

`--plots` draws tokens/s and time to first token against concurrency with matplotlib
(`pip install matplotlib` into the venv first).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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

from models.gguf_convert import find_smollm2_gguf  # noqa: E402
from models.prompts import CHAT_TEMPLATES, render  # noqa: E402

LLAMA_CPP_VERSION = "0.3.16"
TOKEN = "bench-token"
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
SYSTEMS = ("raw CTranslate2", "replicant", "llama.cpp")


class Requests:
    """Numbered (system prompt, prompt) pairs: no two requests share a prefix beyond a few
    tokens, in every system alike."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)

    def next(self) -> tuple[str, str]:
        n = next(self._numbers)
        return f"Request {n}. {SYSTEM}", PROMPTS[n % len(PROMPTS)]


def chatml(system: str, prompt: str) -> str:
    return render(CHAT_TEMPLATES["chatml"], prompt=prompt, system_prompt=system)


def summarize(requests: list[dict[str, float]], wall: float) -> dict[str, float]:
    latencies = sorted(r["latency"] for r in requests)
    return {
        "requests": len(requests),
        "tokens": sum(r["tokens"] for r in requests),
        "tokens_per_request": sum(r["tokens"] for r in requests) / len(requests),
        "tokens_per_s": sum(r["tokens"] for r in requests) / wall,
        "ttft_p50_s": statistics.median(r["ttft"] for r in requests),
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": statistics.quantiles(latencies, n=20, method="inclusive")[-1]
        if len(latencies) > 1
        else latencies[0],
    }


# -- raw CTranslate2 --------------------------------------------------------------------------


def raw_level(
    generator: Any, tokenizer: tokenizers.Tokenizer, numbers: Requests, clients: int, args: Any
) -> dict[str, float]:
    """`clients` requests at once, `rounds` times: one generate_batch per round."""
    results: list[dict[str, float]] = []
    start = time.perf_counter()
    for _ in range(args.rounds):
        batch = [tokenizer.encode(chatml(*numbers.next())).tokens for _ in range(clients)]
        began = time.perf_counter()
        first: dict[int, float] = {}

        def on_step(step: Any, first: dict[int, float] = first) -> bool:
            first.setdefault(step.batch_id, time.perf_counter())
            return False

        out = generator.generate_batch(
            batch,
            max_length=args.max_tokens,
            min_length=args.max_tokens if args.force_length else 0,
            sampling_topk=1,
            end_token=list(END_TOKENS),
            include_prompt_in_result=False,
            callback=on_step,
        )
        ended = time.perf_counter()
        for i, r in enumerate(out):
            results.append(
                {
                    "ttft": first[i] - began,
                    "latency": ended - began,
                    "tokens": len(r.sequences_ids[0]),
                }
            )
    return summarize(results, time.perf_counter() - start)


# -- HTTP clients -----------------------------------------------------------------------------


async def replicant_request(
    session: aiohttp.ClientSession, base: str, numbers: Requests, args: Any
) -> dict[str, float]:
    system, prompt = numbers.next()
    began = time.perf_counter()
    body = {
        "input": {
            "prompt": prompt,
            "system_prompt": system,
            "max_tokens": args.max_tokens,
            "min_tokens": args.max_tokens if args.force_length else 0,
            "temperature": 0,
        }
    }
    async with session.post(f"{base}/v1/models/{MODEL}/predictions", json=body) as resp:
        created = await resp.json()
        assert resp.status == 201, created
    first = None
    async with session.get(created["urls"]["stream"]) as resp:
        event = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line == "" and event:
                if event == "output" and first is None:
                    first = time.perf_counter()
                if event == "done":
                    break
                event = ""
    ended = time.perf_counter()
    async with session.get(created["urls"]["get"]) as resp:
        final = await resp.json()
    assert first is not None and final["status"] == "succeeded", final
    return {
        "ttft": first - began,
        "latency": ended - began,
        "tokens": final["metrics"]["output_token_count"],
    }


async def llama_request(
    session: aiohttp.ClientSession, base: str, numbers: Requests, args: Any, bias: dict[str, float]
) -> dict[str, float]:
    system, prompt = numbers.next()
    began = time.perf_counter()
    body = {
        "prompt": chatml(system, prompt),
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "top_k": 1,
        "stream": True,
    }
    if args.force_length:
        body["logit_bias"] = bias
    first = None
    tokens = 0
    finish = None
    async with session.post(f"{base}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
            if choice.get("text") is not None and not choice.get("finish_reason"):
                tokens += 1
                if first is None:
                    first = time.perf_counter()
    ended = time.perf_counter()
    assert first is not None
    # One chunk per token; the last token may come with the finish reason.
    if finish == "length":
        tokens = args.max_tokens
    tokens = max(tokens, 1)
    return {"ttft": first - began, "latency": ended - began, "tokens": tokens}


async def http_level(make: Any, clients: int, rounds: int) -> dict[str, float]:
    results: list[dict[str, float]] = []

    async def client() -> None:
        for _ in range(rounds):
            results.append(await make())

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return summarize(results, time.perf_counter() - start)


async def wait_until(url: str, proc: subprocess.Popen[bytes], seconds: float) -> None:
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} while starting")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


@contextmanager
def server(
    cmd: Sequence[str], env: dict[str, str], logfile: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with logfile.open("wb") as out:
        proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- llama-cpp-python, built once -------------------------------------------------------------


def llama_cpp_python() -> Path:
    """The Python of a venv with llama-cpp-python[server]; built on first use."""
    venv = ROOT / ".cache" / f"llama-cpp-python-{LLAMA_CPP_VERSION}"
    python = venv / "bin" / "python"
    stamp = venv / ".built"
    if stamp.exists():
        log(f"llama-cpp-python {LLAMA_CPP_VERSION}: using the build in {venv}")
        return python
    log(
        f"building llama-cpp-python {LLAMA_CPP_VERSION} from source into {venv} "
        "(once; several minutes on two cores; pip's progress follows)"
    )
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    started = time.monotonic()
    subprocess.run(
        [str(python), "-m", "pip", "install", "--upgrade", "pip"], check=True, stdout=sys.stderr
    )
    subprocess.run(
        [str(python), "-m", "pip", "install", f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"],
        check=True,
        stdout=sys.stderr,
    )
    stamp.write_text(LLAMA_CPP_VERSION + "\n")
    log(f"built llama-cpp-python in {time.monotonic() - started:.0f} s")
    return python


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(x) for x in args.levels.split(",")]
    threads = args.threads or len(os.sched_getaffinity(0))
    ensure_default_model(args.model_dir)
    gguf = find_smollm2_gguf()
    llama_python = llama_cpp_python()
    tokenizer = tokenizers.Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    numbers = Requests()
    figures: dict[str, dict[int, dict[str, float]]] = {name: {} for name in SYSTEMS}

    log(f"raw CTranslate2 ({threads} threads, float32)")
    generator = ctranslate2.Generator(
        str(args.model_dir), device="cpu", compute_type="float32", intra_threads=threads
    )
    generator.generate_batch([tokenizer.encode("hi").tokens], max_length=4)  # warm-up
    for clients in levels:
        figures[SYSTEMS[0]][clients] = raw_level(generator, tokenizer, numbers, clients, args)
        log(f"  {clients} clients: {figures[SYSTEMS[0]][clients]['tokens_per_s']:.1f} tokens/s")
    del generator

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        catalog = tmp / "catalog.toml"
        catalog.write_text(
            f'[[model]]\nname = "{MODEL}"\nbackend = "ctranslate2"\n'
            f'weights = "{args.model_dir.resolve()}"\n'
            'schema = "huggingfacetb__smollm2-135m-instruct.json"\n'
            f"[model.settings]\nthreads = {threads}\nmax_batch_size = {max(levels)}\n"
            # No seeded requests here: no spare replica loading beside the first runs.
            "seeded_spare = false\n"
        )
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "server", "serve", "--port", str(port)]
        cmd += [
            "--data-dir",
            str(tmp / "data"),
            "--catalog",
            str(catalog),
            "--log-level",
            "warning",
        ]
        env = {**os.environ, "REPLICANT_API_TOKENS": TOKEN}
        log(f"replicant on port {port}")
        with server(cmd, env, tmp / "replicant.log") as proc:
            asyncio.run(wait_until(f"{base}/health-check", proc, 120))
            figures[SYSTEMS[1]] = asyncio.run(replicant_levels(base, numbers, levels, args))

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [str(llama_python), "-m", "llama_cpp.server", "--model", str(gguf)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads)]
        cmd += ["--n_ctx", "2048", "--interrupt_requests", "False", "--verbose", "False"]
        log(f"llama.cpp server on port {port} ({gguf.name})")
        with server(cmd, dict(os.environ), tmp / "llama.log") as proc:
            asyncio.run(wait_until(f"{base}/v1/models", proc, 300))
            end_ids = [tokenizer.token_to_id(t) for t in END_TOKENS]
            bias = {str(i): -1e9 for i in end_ids if i is not None}
            figures[SYSTEMS[2]] = asyncio.run(llama_levels(base, numbers, levels, args, bias))

    return {
        "machine": {
            "cpu": cpu_name(),
            "cores": threads,
            "python": platform.python_version(),
            "ctranslate2": ctranslate2.__version__,
            "llama_cpp_python": LLAMA_CPP_VERSION,
        },
        "settings": {
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "force_length": args.force_length,
            "levels": levels,
            "ctranslate2_model": "float32, converted from the GGUF file",
            "llama_cpp_model": gguf.name,
        },
        "results": {name: {str(k): v for k, v in by.items()} for name, by in figures.items()},
    }


async def replicant_levels(
    base: str, numbers: Requests, levels: list[int], args: Any
) -> dict[int, dict[str, float]]:
    out = {}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=900)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as s:
        warm = argparse.Namespace(max_tokens=4, force_length=False)
        await replicant_request(s, base, numbers, warm)
        for clients in levels:
            out[clients] = await http_level(
                lambda: replicant_request(s, base, numbers, args), clients, args.rounds
            )
            log(f"  {clients} clients: {out[clients]['tokens_per_s']:.1f} tokens/s")
    return out


async def llama_levels(
    base: str, numbers: Requests, levels: list[int], args: Any, bias: dict[str, float]
) -> dict[int, dict[str, float]]:
    out = {}
    timeout = aiohttp.ClientTimeout(total=1800)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
        warm = argparse.Namespace(max_tokens=4, force_length=False)
        await llama_request(s, base, numbers, warm, bias)
        for clients in levels:
            out[clients] = await http_level(
                lambda: llama_request(s, base, numbers, args, bias), clients, args.rounds
            )
            log(f"  {clients} clients: {out[clients]['tokens_per_s']:.1f} tokens/s")
    return out


def table(figures: dict[str, Any]) -> str:
    results = figures["results"]
    lines = [
        f"{'clients':>7}  {'system':<16} {'tokens/s':>9} {'TTFT p50':>9} "
        f"{'latency p50':>12} {'p95':>8} {'tokens/req':>10}"
    ]
    for level in figures["settings"]["levels"]:
        for name in SYSTEMS:
            r = results[name][str(level)]
            ttft_ms = r["ttft_p50_s"] * 1000
            lines.append(
                f"{level:>7}  {name:<16} {r['tokens_per_s']:>9.1f} {ttft_ms:>7.0f}ms "
                f"{r['latency_p50_s']:>11.2f}s {r['latency_p95_s']:>7.2f}s "
                f"{r.get('tokens_per_request', 0):>10.1f}"
            )
    top = str(max(figures["settings"]["levels"]))
    ours, peer = results["replicant"][top], results["llama.cpp"][top]
    one_ours, one_peer = results["replicant"]["1"], results["llama.cpp"]["1"]
    ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
    lines += [
        "",
        f"{top} clients: replicant / llama.cpp total tokens/s = {ratio:.2f}x (target >= 2x): "
        + ("met" if ratio >= 2 else "MISSED"),
        f"{top} clients: p95 latency {ours['latency_p95_s']:.2f}s vs {peer['latency_p95_s']:.2f}s "
        "(target: lower): "
        + ("met" if ours["latency_p95_s"] < peer["latency_p95_s"] else "MISSED"),
        f"1 client: replicant {one_ours['tokens_per_s']:.1f} vs llama.cpp "
        f"{one_peer['tokens_per_s']:.1f} tokens/s",
    ]
    return "\n".join(lines)


def plot(figures: dict[str, Any], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plots needs matplotlib: .venv/bin/pip install matplotlib") from None
    levels = figures["settings"]["levels"]
    results = figures["results"]
    machine = figures["machine"]
    subtitle = (
        f"SmolLM2-135M-Instruct, {figures['settings']['max_tokens']} new tokens, greedy; "
        f"{machine['cores']} cores ({machine['cpu']})"
    )
    written = []
    for key, label, name, scale in (
        ("tokens_per_s", "total tokens/s", "bench-throughput.png", 1.0),
        ("ttft_p50_s", "time to first token, median (ms)", "bench-ttft.png", 1000.0),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for system, marker in zip(SYSTEMS, ("o", "s", "^"), strict=True):
            ys = [results[system][str(level)][key] * scale for level in levels]
            ax.plot(levels, ys, marker=marker, label=system)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_title(subtitle, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="CTranslate2 model directory (prepared from the GGUF file if missing)",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--levels", default="1,2,4,8", help="concurrent clients to measure")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument(
        "--force-length",
        action="store_true",
        help="suppress end-of-text so every request makes exactly --max-tokens",
    )
    parser.add_argument("--threads", type=int, default=0, help="threads per engine (0 = cores)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--plots", type=Path, help="write the PNG plots into this folder")
    parser.add_argument(
        "--from-json", type=Path, help="measure nothing: print and plot figures written before"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        figures = json.loads(args.from_json.read_text())
    else:
        if shutil.which("cmake") is None:
            log("note: cmake is not on PATH; pip builds llama.cpp with the cmake from PyPI")
        figures = run(args)
    print(table(figures))
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        log(f"wrote {args.json}")
    if args.plots:
        for path in plot(figures, args.plots):
            log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
