"""Small helpers every route uses: absolute base URLs, JSON bodies and JSON answers."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from server import keys
from server.errors import MalformedRequest


def base_url(request: web.Request) -> str:
    """Scheme and host for absolute URLs: `--public-url` if set, else what the client used."""
    configured = request.app[keys.CONFIG].public_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 if it is not one, 413 if it is too large."""
    # The content type is not checked: the seed examples send JSON without one.
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise MalformedRequest("The request body must be a JSON object.")
    return body


def _not_json(constant: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON: stored in an input, they would
    # be echoed into answers that strict parsers (JavaScript's JSON.parse) reject.
    raise ValueError(f"{constant} is not a JSON value")


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(data),
        content_type="application/json",
        headers=headers,
    )
