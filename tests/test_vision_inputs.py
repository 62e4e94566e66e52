"""Image inputs through the real server: every form, and every way an image can be bad.

Images come from a second aiohttp app on loopback (the image host), from data: URIs and
from `/v1/files`. Bad ones fail their prediction with an `error` that says what was wrong
(or get a 422 when that is known at create time), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient, TestServer

from server.inputs import FetchRefused, GuardedResolver
from tests.conftest import AUTH, LLAVA, MINIGPT, AppStarter
from tests.test_images import encode, noise, png_bomb
from tests.test_vision_generation import data_uri, png, predict

Client = TestClient[web.Request, web.Application]
AiohttpServer = Callable[..., Awaitable[TestServer]]

CAT = png((200, 120, 40))
OTHER = png((20, 40, 220))


class ImageHost:
    """The loopback web server images are fetched from; it counts requests per path."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.release = asyncio.Event()
        self.server: TestServer | None = None

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def app(self) -> web.Application:
        app = web.Application()

        def serve(body: bytes, content_type: str, **headers: str) -> Any:
            async def handler(request: web.Request) -> web.Response:
                return web.Response(body=body, content_type=content_type, headers=headers)

            return handler

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(request.query["to"])

        async def chain(request: web.Request) -> web.Response:
            left = int(request.match_info["n"])
            if left == 0:
                return web.Response(body=CAT, content_type="image/png")
            raise web.HTTPFound(f"/chain/{left - 1}")

        async def streamed(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()  # chunked: no Content-Length to refuse early
            await response.prepare(request)
            for _ in range(40):
                await response.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10_000)
            return response

        async def loop_a(request: web.Request) -> web.Response:
            raise web.HTTPFound("/loop-b")

        async def loop_b(request: web.Request) -> web.Response:
            raise web.HTTPMovedPermanently("/loop-a")

        async def stall(request: web.Request) -> web.Response:
            await self.release.wait()
            return web.Response(body=CAT)

        @web.middleware
        async def count(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            self.hits[request.path] = self.hits.get(request.path, 0) + 1
            return await handler(request)

        app.middlewares.append(count)
        routes = app.router
        # The type a server claims means nothing: content decides.
        routes.add_get("/cat.txt", serve(CAT, "text/plain"))
        routes.add_get("/cat", serve(CAT, "application/octet-stream"))
        routes.add_get("/photo.jpg", serve(encode(noise(50, 40), "JPEG"), "image/jpeg"))
        routes.add_get(
            "/cat.gz", serve(gzip.compress(CAT), "image/png", **{"Content-Encoding": "gzip"})
        )
        routes.add_get("/page.png", serve(b"<!doctype html><html>Not found</html>", "image/png"))
        routes.add_get("/bomb.png", serve(png_bomb(8000, 8000), "image/png"))
        routes.add_get("/truncated.png", serve(encode(noise(64, 64))[:300], "image/png"))
        routes.add_get("/big.png", serve(b"\x89PNG\r\n\x1a\n" + b"\x00" * 400_000, "image/png"))
        routes.add_get("/streamed.png", streamed)
        zeros = gzip.compress(b"\x00" * 50_000_000, compresslevel=9)
        routes.add_get("/gzip-bomb.png", serve(zeros, "image/png", **{"Content-Encoding": "gzip"}))
        routes.add_get("/brotli.png", serve(CAT, "image/png", **{"Content-Encoding": "br"}))
        routes.add_get("/redirect", redirect)
        routes.add_get("/chain/{n}", chain)
        routes.add_get("/loop-a", loop_a)
        routes.add_get("/loop-b", loop_b)
        routes.add_get("/stall.png", stall)
        return app


@pytest.fixture
async def image_host(aiohttp_server: AiohttpServer) -> AsyncIterator[ImageHost]:
    host = ImageHost()
    app = host.app()
    host.server = await aiohttp_server(app, host="127.0.0.1")
    yield host
    host.release.set()


async def run(client: Client, image: str, model: str = LLAVA) -> dict[str, Any]:
    inputs: dict[str, Any] = {"prompt": "What is this?", "image": image}
    if model == LLAVA:
        inputs |= {"max_tokens": 4, "temperature": 0}
    else:
        inputs |= {"max_new_tokens": 4, "num_beams": 2}
    return await predict(client, model, inputs)


async def test_each_form_gives_the_same_answer(vlm_client: Client, image_host: ImageHost) -> None:
    inline = await run(vlm_client, data_uri(CAT))
    assert inline["status"] == "succeeded", inline
    for path in ("/cat.txt", "/cat", "/cat.gz", "/redirect?to=/cat", "/chain/5"):
        fetched = await run(vlm_client, image_host.url(path))
        assert fetched["status"] == "succeeded", (path, fetched)
        assert fetched["output"] == inline["output"], path
    # An uploaded file, named by either of its URLs.
    form = aiohttp.FormData()
    form.add_field("content", CAT, filename="cat.png", content_type="image/png")
    uploaded = await (await vlm_client.post("/v1/files", data=form, headers=AUTH)).json()
    for url in (uploaded["urls"]["get"], uploaded["urls"]["download"]):
        body = await run(vlm_client, url)
        assert body["status"] == "succeeded" and body["output"] == inline["output"], body
    other = await run(vlm_client, image_host.url("/photo.jpg"))
    assert other["status"] == "succeeded" and other["output"] != inline["output"]
    minigpt = await run(vlm_client, data_uri(OTHER), MINIGPT)
    assert minigpt["status"] == "succeeded" and isinstance(minigpt["output"], str)
    # The stored input keeps what the caller sent, not the bytes.
    assert minigpt["input"]["image"] == data_uri(OTHER)


async def test_own_files_are_read_from_disk_not_fetched(
    start_vlm: AppStarter, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await start_vlm()
    form = aiohttp.FormData()
    form.add_field("content", CAT, filename="cat.png", content_type="image/png")
    uploaded = await (await client.post("/v1/files", data=form, headers=AUTH)).json()
    import server.inputs

    async def no_fetch(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("an own file was fetched over HTTP")

    monkeypatch.setattr(server.inputs.InputResolver, "fetch", no_fetch)
    body = await run(client, uploaded["urls"]["get"])
    assert body["status"] == "succeeded", body
    # Behind a proxy the origin may be one never seen; a stored id is still ours.
    proxied = "https://models.example.com/v1/files/" + uploaded["id"]
    assert (await run(client, proxied))["status"] == "succeeded"
    await client.delete(f"/v1/files/{uploaded['id']}", headers=AUTH)
    gone = await run(client, uploaded["urls"]["get"])
    assert gone["status"] == "failed"
    assert (
        gone["error"]
        == f"image: file {uploaded['id']} was not found on this server (it may have been deleted)"
    )


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/page.png", "is not an image: it looks like an HTML page"),
        ("/bomb.png", "8000×8000 pixels (64.0 megapixels); the limit is 32.0 megapixels"),
        ("/truncated.png", "truncated or corrupt"),
        ("/missing.png", "the server answered 404 Not Found"),
        ("/redirect?to=/loop-a", "redirects in a loop"),
        ("/chain/9", "redirects more than 5 times"),
        (
            "/redirect?to=http://169.254.169.254/latest/meta-data/",
            "169.254.169.254 is a link-local address",
        ),
        ("/redirect?to=ftp://127.0.0.1/cat.png", "a redirect leads to ftp:"),
        ("/brotli.png", "unsupported encoding br"),
    ],
)
async def test_bad_fetched_images_fail_the_prediction(
    vlm_client: Client, image_host: ImageHost, path: str, words: str
) -> None:
    body = await run(vlm_client, image_host.url(path))
    assert body["status"] == "failed", body
    assert body["error"].startswith("image: ") and words in body["error"], body["error"]
    assert body["output"] == []
    assert f"Prediction failed: {body['error']}" in body["logs"]


async def test_size_limits_stop_the_download(start_vlm: AppStarter, image_host: ImageHost) -> None:
    client = await start_vlm(max_image_bytes=100_000)
    for path in ("/big.png", "/streamed.png", "/gzip-bomb.png"):
        body = await run(client, image_host.url(path))
        assert body["status"] == "failed", body
        assert "is larger than the limit of 100000 bytes" in body["error"], body["error"]
    inline = await run(client, data_uri(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100_000))
    assert "holds 100008 bytes; the limit is 100000 bytes" in inline["error"]
    assert (await run(client, image_host.url("/cat")))["status"] == "succeeded"
    smaller = await start_vlm(max_image_pixels=1000)
    body = await run(smaller, data_uri(CAT))
    assert "40×30 pixels" in body["error"] and "limit is 0.0 megapixels" in body["error"]


async def test_fetch_timeout(start_vlm: AppStarter, image_host: ImageHost) -> None:
    client = await start_vlm(fetch_timeout=0.3)
    body = await run(client, image_host.url("/stall.png"))
    assert body["status"] == "failed"
    assert "took longer than 0.3 seconds" in body["error"], body["error"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_and_forbidden_hosts(vlm_client: Client) -> None:
    unreachable = await run(vlm_client, f"http://127.0.0.1:{closed_port()}/cat.png")
    assert unreachable["status"] == "failed"
    assert "could not connect to fetch" in unreachable["error"], unreachable["error"]
    for url, words in [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://[fe80::1]/cat.png", "fe80::1 is a link-local address"),
        ("http://100.100.100.200/latest/meta-data/", "a cloud metadata address"),
        ("http://0.0.0.0/cat.png", "not a unicast address"),
    ]:
        body = await run(vlm_client, url)
        assert body["status"] == "failed", body
        assert "refused to fetch" in body["error"] and words in body["error"], body["error"]
    # Other spellings of 169.254.169.254 never reach a socket either.
    decimal = await run(vlm_client, "http://2852039166/latest/meta-data/")
    assert "is not a canonical IPv4 address" in decimal["error"], decimal["error"]


async def test_names_are_checked_after_resolving() -> None:
    class StubResolver(AbstractResolver):
        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            addresses = {
                "metadata.test": ["169.254.169.254"],
                "mixed.test": ["fe80::1", "10.0.0.7"],
            }
            return [
                ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
                for a in addresses[host]
            ]

        async def close(self) -> None:
            pass

    guarded = GuardedResolver(StubResolver(), deny_private=False)
    with pytest.raises(FetchRefused, match=r"169\.254\.169\.254 is a link-local address"):
        await guarded.resolve("metadata.test", 80)
    assert [r["host"] for r in await guarded.resolve("mixed.test", 80)] == ["10.0.0.7"]
    strict = GuardedResolver(StubResolver(), deny_private=True)
    with pytest.raises(FetchRefused, match=r"10\.0\.0\.7 is a loopback or private address"):
        await strict.resolve("mixed.test", 80)


async def test_private_addresses_can_be_refused(
    start_vlm: AppStarter, image_host: ImageHost
) -> None:
    client = await start_vlm(fetch_deny_private=True)
    body = await run(client, image_host.url("/cat"))
    assert "refused to fetch" in body["error"] and "loopback or private" in body["error"]
    # By name too: localhost is refused once resolved.
    by_name = image_host.url("/cat").replace("127.0.0.1", "localhost")
    body = await run(client, by_name)
    assert "refused to fetch" in body["error"], body["error"]
    assert "localhost resolves only to refused addresses" in body["error"]
    assert image_host.hits.get("/cat") is None  # refused before connecting
    assert (await run(client, data_uri(CAT)))["status"] == "succeeded"


async def test_uploaded_non_image_fails_clearly(vlm_client: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("content", b"just some notes", filename="cat.png", content_type="image/png")
    uploaded = await (await vlm_client.post("/v1/files", data=form, headers=AUTH)).json()
    body = await run(vlm_client, uploaded["urls"]["get"])
    assert body["error"] == f"image: file {uploaded['id']} is not an image: it looks like text"


async def test_server_keeps_serving_after_bad_images(
    vlm_client: Client, image_host: ImageHost
) -> None:
    urls = [
        image_host.url(p) for p in ("/bomb.png", "/truncated.png", "/page.png", "/gzip-bomb.png")
    ]
    results = await asyncio.gather(*(run(vlm_client, u) for u in urls))
    assert all(r["status"] == "failed" for r in results)
    health = await (await vlm_client.get("/health-check")).json()
    assert health["models"][LLAVA]["status"] == "READY"
    assert (await run(vlm_client, data_uri(CAT)))["status"] == "succeeded"


async def test_decoding_runs_off_the_event_loop(
    vlm_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.images

    loop = asyncio.get_running_loop()
    threads: list[bool] = []
    real = models.images.decode_image

    def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            threads.append(False)
        except RuntimeError:
            threads.append(True)  # no running loop in this thread
        return real(*args, **kwargs)

    monkeypatch.setattr("server.inputs.decode_image", spy)
    assert (await run(vlm_client, data_uri(CAT)))["status"] == "succeeded"
    assert threads == [True] and loop.is_running()
