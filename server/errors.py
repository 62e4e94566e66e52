"""Domain errors and the one middleware that renders every error as problem+json.

A route raises an `ApiError` subclass; `problem_middleware` turns it into
`application/problem+json` with `title`, `detail` and `status`. Anything else that escapes a
handler is our bug: it is logged with its traceback and answered with a bare 500 whose body
says nothing about the internals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class ApiError(Exception):
    """An error a client caused or can act on; rendered as problem+json."""

    status: ClassVar[int] = 400
    title: ClassVar[str] = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"title": self.title, "detail": self.detail, "status": self.status, **self.extra}


class MalformedRequest(ApiError):
    status = 400
    title = "Malformed request"


class Unauthenticated(ApiError):
    status = 401
    title = "Unauthenticated"


class NotFound(ApiError):
    status = 404
    title = "Not found"


class MethodNotAllowed(ApiError):
    status = 405
    title = "Method not allowed"


class PayloadTooLarge(ApiError):
    status = 413
    title = "Request body too large"


class UnsupportedMediaType(ApiError):
    status = 415
    title = "Unsupported media type"


class InputInvalid(ApiError):
    """The input breaks the model's schema; `errors` names every offending field."""

    status = 422
    title = "Input validation failed"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        fields = ", ".join(sorted({e["field"] for e in errors}))
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        super().__init__(detail or "invalid input", extra={"invalid_fields": errors})
        self.errors = errors
        self.fields = fields


class RequestInvalid(ApiError):
    """A request field outside `input` (webhook, version, ...) is wrong."""

    status = 422
    title = "Invalid request"


class QueueFull(ApiError):
    status = 429
    title = "Too many requests"


class TooManyStreams(ApiError):
    status = 429
    title = "Too many streams"


class Unavailable(ApiError):
    status = 503
    title = "Service unavailable"


def problem_response(
    status: int, title: str, detail: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> web.Response:
    body = {"title": title, "detail": detail, "status": status, **extra}
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return problem_response(exc.status, exc.title, exc.detail, headers=exc.headers, **exc.extra)
    except web.HTTPRequestEntityTooLarge:
        return problem_response(
            413,
            PayloadTooLarge.title,
            f"The request body is larger than the limit of {request.client_max_size} bytes.",
        )
    except HttpProcessingError as exc:
        # aiohttp's parsers failing on a body read inside a handler (a malformed multipart
        # part header, say): the client's fault, told as such.
        return problem_response(
            400,
            MalformedRequest.title,
            f"The request body cannot be parsed: {str(exc.message)[:200]}",
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own routing errors (404 for unknown paths, 405 for a wrong method).
        detail = {
            404: f"No route matches {request.path}.",
            405: f"{request.method} is not allowed on {request.path}.",
        }.get(exc.status, exc.reason)
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return problem_response(exc.status, exc.reason, detail, headers=headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem_response(
            500, "Internal server error", "The server failed; the error is in its logs."
        )
