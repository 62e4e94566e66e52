"""/v1/files: upload, read, download, list and delete files used as prediction inputs.

`POST /v1/files` takes multipart/form-data as both official clients send it: a `content`
part (filename and content type in its headers) and an optional `metadata` part holding a
JSON object (a plain field from the Python client, a `blob` file part from the JS one).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import BodyPartReader, web

from server.errors import (
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    RequestInvalid,
    UnsupportedMediaType,
)
from server.files import FILES, FileStore, FileTooLarge, StoredFile, Upload, valid_id
from server.http import base_url, json_response
from server.keys import CONFIG

#: Largest `metadata` part accepted, in bytes.
MAX_METADATA_BYTES = 64 * 1024
READ_CHUNK = 256 * 1024


def _store(request: web.Request) -> FileStore:
    store = request.app[FILES]
    store.note_origin(base_url(request))
    return store


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(READ_CHUNK):
        yield chunk


async def _metadata(part: BodyPartReader) -> dict[str, Any]:
    raw = b""
    while chunk := await part.read_chunk(READ_CHUNK):
        raw += chunk
        if len(raw) > MAX_METADATA_BYTES:
            raise PayloadTooLarge(f"metadata is larger than {MAX_METADATA_BYTES} bytes.")
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestInvalid(f"metadata is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RequestInvalid("metadata must be a JSON object.")
    return value


async def create_file(request: web.Request) -> web.Response:
    store = _store(request)
    if not request.content_type.startswith("multipart/"):
        raise UnsupportedMediaType(
            "Upload a file as multipart/form-data with a part named content "
            "(and optionally a part named metadata holding a JSON object)."
        )
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError) as exc:  # aiohttp asserts on a missing boundary
        raise MalformedRequest(f"The multipart body cannot be read: {exc}") from exc
    upload: Upload | None = None
    name: str | None = None
    content_type: str | None = None
    metadata: dict[str, Any] = {}
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: neither client sends one
            if part.name == "content":
                if upload is not None:
                    raise RequestInvalid("Send one part named content, not several.")
                name, content_type = part.filename, part.headers.get("Content-Type")
                upload = await store.receive(_chunks(part))
            elif part.name == "metadata":
                metadata = await _metadata(part)
            else:
                await part.release()
        if upload is None:
            raise RequestInvalid(
                "The upload has no part named content; send the file's bytes in it."
            )
        stored = await store.commit(upload, name=name, content_type=content_type, metadata=metadata)
    except FileTooLarge as exc:
        raise PayloadTooLarge(f"The file is larger than the limit of {exc.limit} bytes.") from exc
    except BaseException:
        if upload is not None:
            await store.discard(upload)
        raise
    return json_response(stored.to_wire(base_url(request)), status=201)


async def _get(request: web.Request) -> tuple[FileStore, StoredFile]:
    store = _store(request)
    file_id = request.match_info["id"]
    stored = await store.get(file_id) if valid_id(file_id) else None
    if stored is None:
        raise NotFound(f"File {file_id!r} was not found.")
    return store, stored


async def get_file(request: web.Request) -> web.Response:
    _, stored = await _get(request)
    return json_response(stored.to_wire(base_url(request)))


async def download_file(request: web.Request) -> web.StreamResponse:
    store, stored = await _get(request)
    path = store.path(stored.id)
    return web.FileResponse(
        path,
        headers={
            "Content-Type": stored.content_type,
            # Uploaded bytes are never rendered as a page of this origin.
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(stored.name)}",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox",
            "ETag": f'"{stored.md5}"',
        },
    )


async def delete_file(request: web.Request) -> web.Response:
    store = _store(request)
    file_id = request.match_info["id"]
    if not await store.delete(file_id):
        raise NotFound(f"File {file_id!r} was not found.")
    return web.Response(status=204)


async def list_files(request: web.Request) -> web.Response:
    store = _store(request)
    try:
        page = await store.page(
            limit=request.app[CONFIG].page_size, cursor=request.query.get("cursor")
        )
    except ValueError as exc:
        raise MalformedRequest("The cursor is not one this server made.") from exc
    base = base_url(request)
    next_url = (
        f"{base}/v1/files?{urlencode({'cursor': page.next_cursor})}" if page.next_cursor else None
    )
    return json_response(
        {
            "next": next_url,
            "previous": None,
            "results": [f.to_wire(base) for f in page.files],
        }
    )


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{id}", get_file)
    app.router.add_get("/v1/files/{id}/download", download_file)
    app.router.add_delete("/v1/files/{id}", delete_file)
