"""`replicant serve` as a user runs it: flags, startup output, the generated token."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from server.auth import TOKEN_FILE
from tests.conftest import catalog_toml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_help_explains_every_flag() -> None:
    code, out = await run("serve", "--help")
    assert code == 0
    for flag in (
        "--host",
        "--port",
        "--data-dir",
        "--catalog",
        "--public-url",
        "--max-body-bytes",
        "--queue-size",
        "--flush-interval",
        "--log-level",
    ):
        assert flag in out
    assert "REPLICANT_API_TOKENS" in out
    code, out = await run("--version")
    assert code == 0 and out.startswith("replicant ")


async def test_bad_catalog_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "catalog.toml"
    bad.write_text("[[model]]\nname = 'x'\n")
    code, out = await run("serve", "--catalog", str(bad), "--data-dir", str(tmp_path / "d"))
    assert code == 2
    assert "catalog" in out and "Traceback" not in out


async def serve(
    *args: str, cwd: Path, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, str]:
    """Start `replicant serve` with `args`; the process and the banner it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "serve",
        *args,
        "--log-level",
        "warning",
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    banner = []
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stdout.readline()).decode()
            assert line, "the server exited before printing its banner"
            banner.append(line)
            if "API description" in line:
                break
    return proc, "".join(banner)


async def start(
    tmp_path: Path, tiny_model: Path, port: int
) -> tuple[asyncio.subprocess.Process, str]:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(catalog_toml(tiny_model))
    env = {k: v for k, v in os.environ.items() if k != "REPLICANT_API_TOKENS"}
    args = ["--port", str(port), "--catalog", str(catalog), "--data-dir", str(tmp_path / "data")]
    return await serve(*args, cwd=ROOT, env=env)


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 30)


@pytest.fixture
def processes() -> Iterator[list[asyncio.subprocess.Process]]:
    """Servers a test started; killed afterwards if the test left them running."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()


async def test_first_start_generates_and_prints_a_token_once(
    tmp_path: Path, tiny_model: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    port = free_port()
    proc, banner = await start(tmp_path, tiny_model, port)
    processes.append(proc)
    token_file = tmp_path / "data" / TOKEN_FILE
    token = token_file.read_text().strip()
    assert token.startswith("r8_") and token in banner
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"http://127.0.0.1:{port}" in banner
    assert "huggingfacetb/smollm2-135m-instruct" in banner
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"http://127.0.0.1:{port}/v1/account", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == 200
        async with session.get(f"http://127.0.0.1:{port}/v1/account") as resp:
            assert resp.status == 401
    assert await stop(proc) == 0
    proc, banner = await start(tmp_path, tiny_model, port)
    processes.append(proc)
    assert token not in banner and str(token_file) in banner
    assert await stop(proc) == 0


async def test_the_built_in_catalog_with_a_relative_data_dir(
    tmp_path: Path, tiny_model: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    """As `scripts/serve` runs it: no --catalog, `--data-dir data` from the working folder."""
    prepared = tmp_path / "data" / "models" / "smollm2-135m-instruct"
    prepared.parent.mkdir(parents=True)
    prepared.symlink_to(tiny_model, target_is_directory=True)
    port = free_port()
    proc, _ = await serve(
        "--port",
        str(port),
        "--data-dir",
        "data",
        cwd=tmp_path,
        env={**os.environ, "REPLICANT_API_TOKENS": "r8_relative", "PYTHONPATH": str(ROOT)},
    )
    processes.append(proc)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        health: dict[str, object] = {}
        async with asyncio.timeout(60):
            while health.get("status") not in ("READY", "SETUP_FAILED"):
                await asyncio.sleep(0.2)
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{url}/health-check") as resp:
                        health = await resp.json()
        assert health["status"] == "READY", health
        async with session.post(
            f"{url}/v1/run",
            json={"model": "huggingfacetb/smollm2-135m-instruct", "input": {"prompt": "hi"}},
            headers={"Authorization": "Bearer r8_relative"},
        ) as resp:
            assert resp.status == 201
            assert (await resp.json())["status"] == "succeeded"
    assert (tmp_path / "data" / "replicant.sqlite3").exists()
    assert await stop(proc) == 0
