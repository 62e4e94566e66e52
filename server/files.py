"""FileStore: files uploaded through `/v1/files`, kept under `<data dir>/files`.

The bytes live in one file per upload, named by its id; the metadata (name, type, size,
checksums, the caller's metadata) is a row of the `files` table in the server's SQLite
database (migration 3 in server.store), so listing pages newest first and deleting are one
statement each and never disagree with a half-written sidecar. Uploads stream to a
temporary file with their checksums computed on the way, and are renamed into place only
once complete and within the size limit.

A file's URL (`urls.get`) is also how a prediction names it as an input; `server.inputs`
resolves such URLs here, on disk, instead of fetching them over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import unicodedata
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
import attrs
from aiohttp import web

from models.images import FORMATS, sniff_image
from server.records import format_time, new_prediction_id, parse_time, utcnow
from server.store import SQLITE_MAX_INT, first_row

_ID = re.compile(r"^[a-z0-9]{20,64}$")
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_COLUMNS = "id, name, content_type, size, sha256, md5, metadata, created_at"
#: Bytes handed to a thread per write while an upload streams to disk.
WRITE_CHUNK = 256 * 1024


class FileTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is larger than the limit of {limit} bytes")
        self.limit = limit


@attrs.frozen(kw_only=True)
class StoredFile:
    id: str
    name: str
    content_type: str
    size: int
    sha256: str
    md5: str
    metadata: dict[str, Any]
    created_at: datetime

    def to_wire(self, base_url: str) -> dict[str, Any]:
        """The File object as the official clients parse it (replicate.file.File)."""
        return {
            "id": self.id,
            "name": self.name,
            "content_type": self.content_type,
            "size": self.size,
            "etag": self.md5,
            "checksums": {"sha256": self.sha256, "md5": self.md5},
            "metadata": self.metadata,
            "created_at": format_time(self.created_at),
            "expires_at": None,
            "urls": {
                "get": f"{base_url}/v1/files/{self.id}",
                "download": f"{base_url}/v1/files/{self.id}/download",
            },
        }


@attrs.define
class Upload:
    """Bytes received into a temporary file, not yet a stored file."""

    temp: Path
    size: int = 0
    head: bytes = b""
    sha256: Any = attrs.field(factory=hashlib.sha256)
    md5: Any = attrs.field(factory=lambda: hashlib.md5(usedforsecurity=False))


@attrs.frozen
class FilePage:
    files: list[StoredFile]
    next_cursor: str | None


def valid_id(file_id: str) -> bool:
    return bool(_ID.match(file_id))


def clean_name(name: str | None) -> str:
    """A display name: the last path component, no control characters, at most 255 chars."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    return base[:255] or "file"


def clean_content_type(value: str | None, head: bytes) -> str:
    """The declared media type if well formed; a sniffed image type beats a generic one."""
    declared = (value or "").split(";")[0].strip().lower()
    if not _MEDIA_TYPE.match(declared):
        declared = "application/octet-stream"
    if declared == "application/octet-stream":
        fmt = sniff_image(head)
        if fmt is not None:
            return FORMATS[fmt]
    return declared


def _row(row: Sequence[Any]) -> StoredFile:
    created = parse_time(row[7])
    assert created is not None
    return StoredFile(
        id=row[0],
        name=row[1],
        content_type=row[2],
        size=int(row[3]),
        sha256=row[4],
        md5=row[5],
        metadata=json.loads(row[6]),
        created_at=created,
    )


class FileStore:
    """Uploaded files: bytes on disk, metadata in SQLite. Open with `FileStore.open`."""

    def __init__(self, db: aiosqlite.Connection, root: Path, *, max_bytes: int) -> None:
        self._db = db
        self.root = root
        self.max_bytes = max_bytes
        #: Base URLs this server has answered under (scheme://host[:port]); file URLs with
        #: one of these origins are this server's own (see server.inputs).
        self.origins: set[str] = set()

    @classmethod
    async def open(cls, database: Path, root: Path, *, max_bytes: int) -> FileStore:
        """Open after `PredictionStore.open`, which has migrated the database."""
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        db = await aiosqlite.connect(database)
        await db.execute("PRAGMA busy_timeout=5000")
        store = cls(db, root, max_bytes=max_bytes)
        await asyncio.to_thread(store._remove_partial_uploads)
        return store

    async def close(self) -> None:
        await self._db.close()

    def _remove_partial_uploads(self) -> None:
        for path in self.root.glob(".upload-*"):
            with contextlib.suppress(OSError):
                path.unlink()

    def path(self, file_id: str) -> Path:
        if not valid_id(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / file_id

    def note_origin(self, base_url: str) -> None:
        if len(self.origins) < 64:  # a handful in practice; bounded against odd Host headers
            self.origins.add(base_url.rstrip("/").lower())

    async def receive(self, chunks: AsyncIterator[bytes]) -> Upload:
        """Stream an upload to a temporary file; FileTooLarge past `max_bytes` (nothing kept).

        Then `commit` it (or `discard` it if the request turns out wrong).
        """
        upload = Upload(self.root / f".upload-{secrets.token_hex(8)}")
        handle = await asyncio.to_thread(upload.temp.open, "wb")

        def write(data: bytes) -> None:  # on a worker thread: hashing and writing both block
            upload.sha256.update(data)
            upload.md5.update(data)
            handle.write(data)

        try:
            pending: list[bytes] = []
            pending_size = 0
            async for chunk in chunks:
                upload.size += len(chunk)
                if upload.size > self.max_bytes:
                    raise FileTooLarge(self.max_bytes)
                if len(upload.head) < 64:
                    upload.head = (upload.head + chunk)[:64]
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_CHUNK:
                    await asyncio.to_thread(write, b"".join(pending))
                    pending, pending_size = [], 0
            if pending:
                await asyncio.to_thread(write, b"".join(pending))
        except BaseException:
            await asyncio.to_thread(handle.close)
            await self.discard(upload)
            raise
        await asyncio.to_thread(handle.close)
        return upload

    async def discard(self, upload: Upload) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(upload.temp.unlink)

    async def commit(
        self,
        upload: Upload,
        *,
        name: str | None,
        content_type: str | None,
        metadata: dict[str, Any],
    ) -> StoredFile:
        """Move a received upload into place and record it."""
        stored = StoredFile(
            id=new_prediction_id(),
            name=clean_name(name),
            content_type=clean_content_type(content_type, upload.head),
            size=upload.size,
            sha256=upload.sha256.hexdigest(),
            md5=upload.md5.hexdigest(),
            metadata=metadata,
            created_at=utcnow(),
        )
        final = self.root / stored.id
        try:
            await asyncio.to_thread(os.replace, upload.temp, final)
            await self._db.execute_insert(
                f"INSERT INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.id,
                    stored.name,
                    stored.content_type,
                    stored.size,
                    stored.sha256,
                    stored.md5,
                    json.dumps(stored.metadata),
                    format_time(stored.created_at),
                ),
            )
            await self._db.commit()
        except BaseException:
            for path in (upload.temp, final):
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(path.unlink)
            raise
        return stored

    async def get(self, file_id: str) -> StoredFile | None:
        if not valid_id(file_id):
            return None
        row = first_row(
            await self._db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM files WHERE id = ?", (file_id,)
            )
        )
        return _row(row) if row else None

    async def delete(self, file_id: str) -> bool:
        if not valid_id(file_id):
            return False
        async with self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)) as cursor:
            deleted = cursor.rowcount
        await self._db.commit()
        if deleted == 0:
            return False
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.path(file_id).unlink)
        return True

    async def read(self, file_id: str, *, limit: int) -> bytes | None:
        """The bytes of a stored file (None if unknown); ValueError if larger than `limit`."""
        stored = await self.get(file_id)
        if stored is None:
            return None
        if stored.size > limit:
            raise ValueError(f"is {stored.size} bytes, more than the limit of {limit} bytes")
        try:
            return await asyncio.to_thread(self.path(file_id).read_bytes)
        except FileNotFoundError:
            return None

    async def page(self, *, limit: int, cursor: str | None = None) -> FilePage:
        """Newest first; `cursor` is a `next_cursor` of an earlier page (ValueError if not)."""
        params: list[Any] = []
        clause = ""
        if cursor is not None:
            clause = "WHERE seq < ?"
            params.append(_decode_cursor(cursor))
        rows = list(
            await self._db.execute_fetchall(
                f"SELECT seq, {_COLUMNS} FROM files {clause} ORDER BY seq DESC LIMIT ?",
                (*params, limit + 1),
            )
        )
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor(int(rows[-1][0])) if more and rows else None
        return FilePage([_row(r[1:]) for r in rows], next_cursor)


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"f:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, seq = raw.partition(":")
        if kind != "f" or not 0 <= int(seq) <= SQLITE_MAX_INT:
            raise ValueError(kind)
        return int(seq)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not a cursor this server made") from exc


FILES = web.AppKey("files", FileStore)
