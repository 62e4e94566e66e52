"""Resolving `format: uri` inputs just before a job runs (`PredictionService.input_preparer`).

Every schema field with `format: uri` and a string value is turned into bytes, from:

* a `data:` URI (decoded here);
* a file uploaded to this server (`urls.get` or `urls.download` of `/v1/files`), read from
  disk, never over HTTP: the official clients upload a local file and pass that URL;
* an `http(s)` URL, fetched with aiohttp: a total time limit, a byte limit counted on the
  decoded body (so a gzip bomb stops at the limit), redirects followed by hand (at most
  five, loops refused) so every hop is checked, and never to link-local or cloud metadata
  addresses, whether written as an IP or reached through DNS (loopback and private
  addresses are allowed unless `--fetch-deny-private`).

Bytes that are an image (by their content, whatever the URL or Content-Type says) are
decoded off the event loop with the server's limits into a `models.images.DecodedImage`;
other bytes reach the model as `models.images.InputFile`. Any failure raises
`InputUnavailable`, whose message becomes the prediction's `error`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import zlib
from collections.abc import Mapping
from typing import Any

import aiohttp
import attrs
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from models.base import Job
from models.catalog import ModelEntry
from models.images import (
    DecodedImage,
    ImageInvalid,
    ImageLimits,
    InputFile,
    decode_image,
    parse_data_uri,
    sniff_image,
)
from server import __version__
from server.files import FileStore
from server.webhooks.guard import forbidden_reason

MAX_REDIRECTS = 5
_FILE_PATH = re.compile(r"^/v1/files/([a-z0-9]{20,64})(?:/download)?/?$")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
READ_CHUNK = 64 * 1024


class InputUnavailable(Exception):
    """A `format: uri` input that could not be turned into what the model takes."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class FetchRefused(OSError):
    """The host is, or resolves to, an address inputs may not be fetched from."""


@attrs.frozen(kw_only=True)
class FetchSettings:
    timeout: float = 30.0
    deny_private: bool = False
    limits: ImageLimits = attrs.field(factory=ImageLimits)


def refusal(host: str, *, deny_private: bool) -> str | None:
    """Why `host` (an IP literal) may not be fetched from; None for names and allowed IPs."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
    reason = forbidden_reason(address, deny_private=deny_private)
    return f"{host} is {reason}" if reason else None


class GuardedResolver(AbstractResolver):
    """Resolves names and drops the addresses inputs may not be fetched from."""

    def __init__(self, inner: AbstractResolver, *, deny_private: bool) -> None:
        self._inner = inner
        self._deny_private = deny_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = []
        reasons = set()
        for result in results:
            reason = refusal(result["host"], deny_private=self._deny_private)
            if reason is None:
                allowed.append(result)
            else:
                reasons.add(reason)
        if not allowed:
            raise FetchRefused(
                f"{host} resolves only to refused addresses: {'; '.join(sorted(reasons))}"
            )
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def uri_fields(entry: ModelEntry) -> list[str]:
    props: Mapping[str, Any] = entry.schema.input.get("properties", {})
    return [n for n, p in props.items() if isinstance(p, Mapping) and p.get("format") == "uri"]


class InputResolver:
    """The input preparer: one aiohttp session for fetches, the file store for own files."""

    def __init__(
        self,
        files: FileStore,
        settings: FetchSettings,
        *,
        own_origins: frozenset[str] = frozenset(),
    ) -> None:
        self.files = files
        self.settings = settings
        self._own = own_origins
        resolver = GuardedResolver(aiohttp.ThreadedResolver(), deny_private=settings.deny_private)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=resolver, limit=16),
            auto_decompress=False,  # decompressed here, bounded; see _read_body
            trust_env=False,
            headers={"User-Agent": f"replicant/{__version__}", "Accept": "image/*, */*;q=0.5"},
        )

    async def close(self) -> None:
        await self._session.close()

    async def prepare(self, entry: ModelEntry, job: Job) -> None:
        """Replace each `format: uri` string of the job's input by its bytes or image."""
        resolved: dict[str, Any] = {}
        for field in uri_fields(entry):
            value = job.input.get(field)
            if isinstance(value, str):
                resolved[field] = await self.resolve(field, value)
        if resolved:
            job.input = {**job.input, **resolved}

    async def resolve(self, field: str, value: str) -> DecodedImage | InputFile:
        data, source = await self.read(field, value)
        if sniff_image(data) is None:
            return InputFile(data=data, source=source)
        try:
            return await asyncio.to_thread(decode_image, data, self.settings.limits, source=source)
        except ImageInvalid as exc:
            raise InputUnavailable(field, str(exc)) from exc

    async def read(self, field: str, value: str) -> tuple[bytes, str]:
        """(bytes, a short description of where they came from) of one input."""
        limit = self.settings.limits.max_bytes
        if value[:5].lower() == "data:":
            try:
                _, data = await asyncio.to_thread(parse_data_uri, value)
            except ValueError as exc:
                raise InputUnavailable(field, f"the value {exc}") from exc
            if len(data) > limit:
                raise InputUnavailable(
                    field, f"the data: URI holds {len(data)} bytes; the limit is {limit} bytes"
                )
            return data, "the data: URI"
        try:
            url = URL(value)
            url.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise InputUnavailable(field, f"{value!r} is not a valid URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise InputUnavailable(
                field, "must be an http(s) URL, a data: URI or the URL of an uploaded file"
            )
        own = await self._own_file(field, url)
        if own is not None:
            return own
        return await self.fetch(field, url), str(url.with_query(None).with_fragment(None))

    def _is_own_origin(self, url: URL) -> bool:
        origin = str(url.origin()).lower()
        return origin in self._own or origin in self.files.origins

    async def _own_file(self, field: str, url: URL) -> tuple[bytes, str] | None:
        match = _FILE_PATH.match(url.path)
        if match is None:
            return None
        file_id = match.group(1)
        own_origin = self._is_own_origin(url)
        # An id is 26 random characters: a URL elsewhere that names one of ours by accident
        # does not happen, so a stored id is ours even under an origin not seen yet
        # (behind a proxy, before any files request since the restart).
        if not own_origin and await self.files.get(file_id) is None:
            return None
        source = f"file {file_id}"
        try:
            data = await self.files.read(file_id, limit=self.settings.limits.max_bytes)
        except ValueError as exc:
            raise InputUnavailable(field, f"{source} {exc}") from exc
        if data is None:
            raise InputUnavailable(
                field, f"{source} was not found on this server (it may have been deleted)"
            )
        return data, source

    async def fetch(self, field: str, url: URL) -> bytes:
        """GET an http(s) URL within the time and size limits, checking every hop."""
        timeout = self.settings.timeout
        seen: set[str] = set()
        try:
            async with asyncio.timeout(timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    reason = refusal(url.host or "", deny_private=self.settings.deny_private)
                    if reason is not None:
                        raise InputUnavailable(field, f"refused to fetch {url}: {reason}")
                    key = str(url.with_fragment(None))
                    if key in seen:
                        raise InputUnavailable(field, f"{url} redirects in a loop")
                    seen.add(key)
                    async with self._session.get(url, allow_redirects=False) as response:
                        if response.status in _REDIRECTS:
                            location = response.headers.get("Location")
                            if not location:
                                raise InputUnavailable(
                                    field, f"{url} redirects ({response.status}) to nowhere"
                                )
                            url = url.join(URL(location))
                            if url.scheme not in ("http", "https"):
                                raise InputUnavailable(
                                    field, f"a redirect leads to {url.scheme}:, not http(s)"
                                )
                            continue
                        if response.status != 200:
                            raise InputUnavailable(
                                field,
                                f"could not fetch {url}: the server answered "
                                f"{response.status} {response.reason or ''}".rstrip(),
                            )
                        return await self._read_body(field, url, response)
                raise InputUnavailable(field, f"{url} redirects more than {MAX_REDIRECTS} times")
        except TimeoutError as exc:
            raise InputUnavailable(
                field, f"fetching {url} took longer than {timeout:g} seconds"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, FetchRefused):
                raise InputUnavailable(field, f"refused to fetch {url}: {exc.os_error}") from exc
            raise InputUnavailable(field, f"could not connect to fetch {url}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise InputUnavailable(field, f"could not fetch {url}: {exc}") from exc

    async def _read_body(self, field: str, url: URL, response: aiohttp.ClientResponse) -> bytes:
        limit = self.settings.limits.max_bytes
        too_large = InputUnavailable(field, f"{url} is larger than the limit of {limit} bytes")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            decompressor = None
            if response.content_length is not None and response.content_length > limit:
                raise too_large
        elif encoding in ("gzip", "x-gzip", "deflate"):
            decompressor = zlib.decompressobj(wbits=47)  # gzip or zlib header
        else:
            raise InputUnavailable(field, f"{url} is sent with an unsupported encoding {encoding}")
        body = bytearray()
        async for chunk in response.content.iter_chunked(READ_CHUNK):
            if decompressor is None:
                body += chunk
            else:
                data = chunk
                while data:
                    # At most one byte past the limit per call, whatever the ratio.
                    body += decompressor.decompress(data, limit + 1 - len(body))
                    data = decompressor.unconsumed_tail
                    if len(body) > limit:
                        break
            if len(body) > limit:
                raise too_large
        if decompressor is not None:
            body += decompressor.flush(limit + 1 - len(body))
            if len(body) > limit:
                raise too_large
        return bytes(body)
