"""/v1/files over raw HTTP, and file inputs from both official clients, unchanged.

The Python client (replicate 1.0.7) uploads a local file object through `POST /v1/files` and
puts the returned `urls.get` into the input; the JS client (replicate 1.4.0, run by node)
does the same with a Buffer. The server resolves its own file URL from disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from replicate.client import Client as ReplicateClient

from tests.conftest import AUTH, LLAVA, MINIGPT, ROOT, TOKEN, AppStarter
from tests.test_vision_generation import data_uri, png, predict

Client = TestClient[web.Request, web.Application]
ID = re.compile(r"^[a-z2-7]{26}$")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
FILE_FIELDS = {
    "id",
    "name",
    "content_type",
    "size",
    "etag",
    "checksums",
    "metadata",
    "created_at",
    "urls",
}
IMAGE = png((250, 200, 10), size=(33, 21))
REPLICATE_JS_VERSION = "1.4.0"
NODE_DIR = ROOT / ".cache" / "node"


async def upload(
    client: Client,
    content: bytes,
    *,
    filename: str = "cat.png",
    content_type: str = "image/png",
    metadata: Any = None,
) -> aiohttp.ClientResponse:
    # Raw UTF-8 filenames, as httpx (Python client) and undici (JS client) send them.
    form = aiohttp.FormData(quote_fields=False)
    if metadata is not None:
        form.add_field("metadata", json.dumps(metadata))
    form.add_field("content", content, filename=filename, content_type=content_type)
    return await client.post("/v1/files", data=form, headers=AUTH)


async def test_upload_get_download_list_delete(vlm_client: Client) -> None:
    resp = await upload(vlm_client, IMAGE, metadata={"purpose": "test", "n": 1})
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert set(created) >= FILE_FIELDS
    assert ID.match(created["id"]) and TIME.match(created["created_at"])
    assert created["name"] == "cat.png" and created["content_type"] == "image/png"
    assert created["size"] == len(IMAGE)
    assert created["checksums"] == {
        "sha256": hashlib.sha256(IMAGE).hexdigest(),
        "md5": hashlib.md5(IMAGE).hexdigest(),
    }
    assert created["etag"] == hashlib.md5(IMAGE).hexdigest()
    assert created["metadata"] == {"purpose": "test", "n": 1}
    base = str(vlm_client.server.make_url("")).rstrip("/")
    assert created["urls"] == {
        "get": f"{base}/v1/files/{created['id']}",
        "download": f"{base}/v1/files/{created['id']}/download",
    }
    got = await (await vlm_client.get(f"/v1/files/{created['id']}", headers=AUTH)).json()
    assert got == created
    download = await vlm_client.get(f"/v1/files/{created['id']}/download", headers=AUTH)
    assert download.status == 200 and await download.read() == IMAGE
    assert download.headers["Content-Type"] == "image/png"
    assert download.headers["Content-Disposition"].startswith("attachment")
    assert download.headers["X-Content-Type-Options"] == "nosniff"
    listed = await (await vlm_client.get("/v1/files", headers=AUTH)).json()
    assert listed["results"][0] == created and listed["next"] is None
    resp = await vlm_client.delete(f"/v1/files/{created['id']}", headers=AUTH)
    assert resp.status == 204 and await resp.read() == b""
    for method, path in (
        ("GET", f"/v1/files/{created['id']}"),
        ("GET", f"/v1/files/{created['id']}/download"),
        ("DELETE", f"/v1/files/{created['id']}"),
        ("GET", "/v1/files/not-an-id"),
    ):
        resp = await vlm_client.request(method, path, headers=AUTH)
        assert resp.status == 404, (method, path)
        assert resp.content_type == "application/problem+json"


async def test_upload_needs_a_token(vlm_client: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("content", IMAGE, filename="cat.png")
    resp = await vlm_client.post("/v1/files", data=form)
    assert resp.status == 401
    assert (await vlm_client.get("/v1/files")).status == 401


async def test_bad_uploads(start_vlm: AppStarter, tmp_path: Path) -> None:
    client = await start_vlm(max_file_bytes=1000)
    too_big = await upload(client, b"x" * 1001)
    assert too_big.status == 413
    assert "larger than the limit of 1000 bytes" in (await too_big.json())["detail"]
    assert (await upload(client, b"x" * 1000)).status == 201
    # Nothing half-written is left behind.
    files = sorted(p.name for p in (tmp_path / "data" / "files").iterdir())
    assert len(files) == 1 and not files[0].startswith(".")
    resp = await client.post("/v1/files", json={"content": "x"}, headers=AUTH)
    assert resp.status == 415
    form = aiohttp.FormData()
    form.add_field("metadata", "{}")
    form.add_field("other", b"x", filename="x.bin")
    resp = await client.post("/v1/files", data=form, headers=AUTH)
    assert resp.status == 422 and "no part named content" in (await resp.json())["detail"]
    for metadata, words in (("{nope", "not valid JSON"), ("[1, 2]", "must be a JSON object")):
        form = aiohttp.FormData()
        form.add_field("content", b"x", filename="x.bin")
        form.add_field("metadata", metadata)
        resp = await client.post("/v1/files", data=form, headers=AUTH)
        assert resp.status == 422 and words in (await resp.json())["detail"]
    assert (await client.get("/v1/files?cursor=bogus", headers=AUTH)).status == 400


async def test_names_types_paging_and_restart(start_vlm: AppStarter, tmp_path: Path) -> None:
    client = await start_vlm(page_size=2)
    # A path and a right-to-left override (a filename-spoofing trick) are cleaned away.
    spoof = "../../etc/pass\u202ewd"
    odd = await (
        await upload(client, IMAGE, filename=spoof, content_type="application/octet-stream")
    ).json()
    assert odd["name"] == "passwd"
    assert odd["content_type"] == "image/png"  # sniffed when the caller did not know
    text = await (
        await upload(client, b"hello", filename="a.txt", content_type="text/plain")
    ).json()
    assert text["content_type"] == "text/plain"
    ids = [odd["id"], text["id"]]
    for i in range(3):
        ids.append((await (await upload(client, bytes([i]) * 10)).json())["id"])
    seen: list[str] = []
    base = str(client.server.make_url("")).rstrip("/")
    page = await (await client.get("/v1/files", headers=AUTH)).json()
    while True:
        seen += [f["id"] for f in page["results"]]
        if page["next"] is None:
            break
        assert page["next"].startswith(f"{base}/v1/files?cursor=")
        page = await (await client.get(page["next"].removeprefix(base), headers=AUTH)).json()
    assert seen == ids[::-1]
    # Files and their rows outlive a restart (same data dir).
    again = await start_vlm(page_size=100)
    listed = await (await again.get("/v1/files", headers=AUTH)).json()
    assert [f["id"] for f in listed["results"]] == ids[::-1]
    download = await again.get(f"/v1/files/{odd['id']}/download", headers=AUTH)
    assert await download.read() == IMAGE
    with sqlite3.connect(tmp_path / "data" / "replicant.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone() == (5,)


# -- the official Python client --------------------------------------------------------------


@pytest.fixture
async def rc(vlm_client: Client) -> AsyncIterator[ReplicateClient]:
    base = str(vlm_client.server.make_url("")).rstrip("/")
    official = ReplicateClient(api_token=TOKEN, base_url=base)
    yield official
    sync_client = getattr(official, "_Client__client", None)
    if sync_client is not None:
        await asyncio.to_thread(sync_client.close)
    async_client = getattr(official, "_Client__async_client", None)
    if async_client is not None:
        await async_client.aclose()


async def test_python_client_files_api(rc: ReplicateClient, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(IMAGE)
    created = await asyncio.to_thread(rc.files.create, path, metadata={"k": "v"})
    assert created.name == "photo.png" and created.content_type == "image/png"
    assert (
        created.size == len(IMAGE)
        and created.checksums["sha256"] == hashlib.sha256(IMAGE).hexdigest()
    )
    assert created.metadata == {"k": "v"} and created.urls["get"].endswith(created.id)
    got = await asyncio.to_thread(rc.files.get, created.id)
    assert got.id == created.id and got.etag == created.etag
    assert [f.id for f in await asyncio.to_thread(rc.files.list)] == [created.id]
    assert await asyncio.to_thread(rc.files.delete, created.id) is True
    assert await asyncio.to_thread(rc.files.list) == []


async def test_python_client_runs_with_a_local_file(
    vlm_client: Client, rc: ReplicateClient, tmp_path: Path
) -> None:
    expected = await predict(
        vlm_client,
        MINIGPT,
        {"prompt": "What is this?", "image": data_uri(IMAGE), "num_beams": 2, "max_new_tokens": 6},
    )
    assert expected["status"] == "succeeded", expected
    path = tmp_path / "photo.png"
    path.write_bytes(IMAGE)

    def run_with_file() -> Any:
        with path.open("rb") as image:
            return rc.run(
                MINIGPT,
                input={
                    "image": image,
                    "prompt": "What is this?",
                    "num_beams": 2,
                    "max_new_tokens": 6,
                },
            )

    output = await asyncio.to_thread(run_with_file)
    assert output == expected["output"]
    uploaded = await (await vlm_client.get("/v1/files", headers=AUTH)).json()
    assert [f["name"] for f in uploaded["results"]] == ["photo.png"]
    # The prediction names the file by its URL, as the hosted API would.
    page = await (await vlm_client.get("/v1/predictions", headers=AUTH)).json()
    assert page["results"][0]["input"]["image"] == uploaded["results"][0]["urls"]["get"]
    # An iterator model with a version: run() returns a generator of strings.
    model = await (await vlm_client.get(f"/v1/models/{LLAVA}", headers=AUTH)).json()
    version = model["latest_version"]["id"]

    def run_llava() -> list[str]:
        with path.open("rb") as image:
            chunks = rc.run(
                f"{LLAVA}:{version}",
                input={"image": image, "prompt": "Hi", "max_tokens": 5, "temperature": 0},
            )
            return list(chunks)

    chunks = await asyncio.to_thread(run_llava)
    assert chunks and all(isinstance(c, str) for c in chunks)


# -- the official JavaScript client ----------------------------------------------------------


@pytest.fixture(scope="session")
def replicate_js() -> Path:
    """replicate@1.4.0 in .cache/node, installed with npm when missing; skips without node."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed, so the JavaScript client cannot be tested here")
    manifest = NODE_DIR / "node_modules" / "replicate" / "package.json"
    installed = json.loads(manifest.read_text())["version"] if manifest.exists() else None
    if installed != REPLICATE_JS_VERSION:
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not; install npm"
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(NODE_DIR),
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                f"replicate@{REPLICATE_JS_VERSION}",
            ],
            check=True,
            timeout=600,
            capture_output=True,
        )
    return manifest.parent


JS_RUN = """
const Replicate = require(process.env.REPLICATE_JS);
(async () => {
  const replicate = new Replicate({ auth: process.env.TOKEN, baseUrl: process.env.BASE + "/v1" });
  const image = Buffer.from(process.env.IMAGE_B64, "base64");
  const output = await replicate.run(process.env.MODEL, {
    input: { image, prompt: "What is this?", num_beams: 2, max_new_tokens: 6 },
  });
  const files = await replicate.files.list();
  console.log(JSON.stringify({ output, files: files.results }));
})().catch((error) => { console.error(error); process.exit(1); });
"""


async def test_js_client_uploads_a_buffer(
    vlm_client: Client, replicate_js: Path, tmp_path: Path
) -> None:
    import base64

    expected = await predict(
        vlm_client,
        MINIGPT,
        {"prompt": "What is this?", "image": data_uri(IMAGE), "num_beams": 2, "max_new_tokens": 6},
    )
    script = tmp_path / "run.cjs"
    script.write_text(JS_RUN)
    process = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "REPLICATE_JS": str(replicate_js),
            "TOKEN": TOKEN,
            "BASE": str(vlm_client.server.make_url("")).rstrip("/"),
            "MODEL": MINIGPT,
            "IMAGE_B64": base64.b64encode(IMAGE).decode(),
        },
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    result = json.loads(stdout)
    assert result["output"] == expected["output"]
    (uploaded,) = result["files"]
    assert uploaded["name"].startswith("buffer_") and uploaded["size"] == len(IMAGE)
    # It came as application/octet-stream; the content says PNG.
    assert uploaded["content_type"] == "image/png"
    assert uploaded["metadata"] == {}
