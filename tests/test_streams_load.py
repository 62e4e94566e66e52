"""Many readers at once: hundreds on one prediction, hundreds over many, and stuck readers.

Every reader must get the whole stream; a reader that never reads must neither hold up the
model nor the others, and is dropped (its slot freed) once a write to it has waited
`stream_send_timeout`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from server import keys
from server.records import Status
from server.routes.streams import STREAM_HUB
from tests.conftest import AUTH, LiveStarter
from tests.test_streams_support import LiveServer, Script, Scripts, collect, output_text

SMOL = "huggingfacetb/smollm2-135m-instruct"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


async def create(http: aiohttp.ClientSession, server: LiveServer, prompt: str) -> str:
    """The stream URL of a new prediction."""
    async with http.post(
        f"{server.url}/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": prompt}},
        headers=AUTH,
    ) as resp:
        assert resp.status == 201, await resp.text()
        url: str = (await resp.json())["urls"]["stream"]
        return url


async def read_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        assert resp.status == 200
        events = await collect(resp)
        assert events[-1].event == "done"
        return output_text(events)


class StuckReader:
    """A client that asks for a stream, then never reads a byte (tiny receive buffer)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before connecting, so the advertised window stays small.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        parts = urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        await loop.sock_connect(self.sock, (parts.hostname, parts.port))
        request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n"
        await loop.sock_sendall(self.sock, request.encode())

    async def read_all(self) -> bytes:
        """Everything the server had sent before it closed or reset the connection."""
        loop = asyncio.get_running_loop()
        data = b""
        try:
            while chunk := await loop.sock_recv(self.sock, 65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data

    def close(self) -> None:
        self.sock.close()


async def _connected(server: LiveServer, count: int) -> None:
    """Until `count` more stream answers have started (their readers follow the log)."""
    for _ in range(count):
        await server.stream_requests.get()


async def test_hundreds_of_readers_on_one_prediction(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    chunks = [f"token {i} " for i in range(40)]
    script = scripts["many"] = Script(chunks, allowed=0)
    url = await create(http, server, "many")
    stuck = StuckReader(url)
    async with asyncio.timeout(120):
        await stuck.open()
        readers = [asyncio.create_task(read_text(http, url)) for _ in range(300)]
        await _connected(server, 301)
        assert len(server.app[STREAM_HUB]) == 301
        script.release()
        texts = await asyncio.gather(*readers)
        assert texts == ["".join(chunks)] * 300
        await server.app[STREAM_HUB].wait_empty()
    stuck.close()


async def test_hundreds_of_readers_over_many_predictions(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server()
    for i in range(100):
        scripts[f"p{i}"] = Script([f"{i}:", "a", "b", "c"], allowed=0)
    urls = [await create(http, server, f"p{i}") for i in range(100)]
    stuck = StuckReader(urls[0])
    async with asyncio.timeout(120):
        await stuck.open()
        readers = [asyncio.create_task(read_text(http, url)) for url in urls for _ in range(3)]
        await _connected(server, 301)
        scripts.release_all()
        texts = await asyncio.gather(*readers)
        assert texts == [f"{i}:abc" for i in range(100) for _ in range(3)]
        await server.app[STREAM_HUB].wait_empty()
    stuck.close()


async def test_a_stuck_reader_slows_nobody_and_is_dropped(
    live_server: LiveStarter, scripts: Scripts, http: aiohttp.ClientSession
) -> None:
    server = await live_server(stream_send_timeout=3)
    chunks = [f"{i:04d}" + "x" * 32764 for i in range(48)]  # 1.5 MiB: more than any buffer
    script = scripts["big"] = Script(chunks, allowed=0)
    async with http.post(
        f"{server.url}/v1/models/{SMOL}/predictions",
        json={"input": {"prompt": "big"}},
        headers=AUTH,
    ) as resp:
        created = await resp.json()
    url = created["urls"]["stream"]
    hub = server.app[STREAM_HUB]
    stuck = StuckReader(url)
    async with asyncio.timeout(60):
        await stuck.open()
        request, _ = await server.stream_requests.get()
        # A small send buffer on the server's side too (as over a slow link); otherwise
        # loopback's autotuned buffers would take the whole stream.
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        readers = [asyncio.create_task(read_text(http, url)) for _ in range(10)]
        await _connected(server, 10)
        script.release()
        # The model and the readers that read finish while the stuck reader is still there.
        prediction = await server.app[keys.PREDICTIONS].wait(created["id"], 30)
        assert prediction.status is Status.SUCCEEDED
        assert await asyncio.gather(*readers) == ["".join(chunks)] * 10
        assert len(hub) == 1
        # Then its write times out: the connection is aborted and its slot freed.
        await hub.wait_empty()
        data = await stuck.read_all()
    stuck.close()
    assert b"event: done" not in data
    assert len(data) < len("".join(chunks))
