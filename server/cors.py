"""CORS: which pages on other origins may read which answers.

A stream URL is a capability (its token is the credential), so by default a page on any
origin may read one: `Access-Control-Allow-Origin: *`, which browsers never combine with
cookies. The API routes take a bearer token; a page on another origin may call them only
from an origin listed in `Config.cors_api_origins` (none by default).

`cors_middleware` (first in the app's list) answers preflights (OPTIONS with
`Access-Control-Request-Method`) before auth and routing see them. `CorsPolicy.add_headers`
(an `on_response_prepare` hook) runs as every other answer is prepared,
so event streams, 204s and problem+json errors all carry the headers (a page cannot read a
401's body without them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
from aiohttp import web

from server.config import Config
from server.errors import problem_response

STREAM_PREFIX = "/v1/streams/"
#: Response headers a page on an allowed origin may read from API answers.
EXPOSED_API_HEADERS = "Location, Preference-Applied, Retry-After, X-Prediction-Id"
#: How long a browser may cache a preflight's answer, in seconds.
PREFLIGHT_MAX_AGE = "600"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@attrs.frozen
class CorsPolicy:
    """The origins allowed on stream URLs and on the API routes; `*` allows any."""

    stream_origins: frozenset[str]
    api_origins: frozenset[str]

    @classmethod
    def from_config(cls, config: Config) -> CorsPolicy:
        return cls(frozenset(config.cors_stream_origins), frozenset(config.cors_api_origins))

    def allow_origin(self, path: str, origin: str) -> str | None:
        """The `Access-Control-Allow-Origin` to answer `origin` with on `path`; None: refuse."""
        origins = self.stream_origins if path.startswith(STREAM_PREFIX) else self.api_origins
        if "*" in origins:
            return "*"
        return origin if origin in origins else None

    def preflight(self, request: web.Request, origin: str) -> web.Response:
        allowed = self.allow_origin(request.path, origin)
        if allowed is None:
            stream = request.path.startswith(STREAM_PREFIX)
            setting = "cors_stream_origins" if stream else "cors_api_origins"
            return problem_response(
                403,
                "Origin not allowed",
                f"Pages on {origin} may not call {request.path} on this server; the allowed "
                f"origins are set with --{setting.replace('_', '-')} "
                f"(REPLICANT_{setting.upper()}).",
            )
        methods = "GET" if request.path.startswith(STREAM_PREFIX) else "GET, POST, DELETE"
        headers = {
            "Access-Control-Allow-Origin": allowed,
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
        }
        requested = request.headers.get("Access-Control-Request-Headers")
        if requested:
            # Any header may come from an allowed origin: it could send them with curl anyway.
            headers["Access-Control-Allow-Headers"] = requested
        response = web.Response(status=204, headers=headers)
        response.headers.add("Vary", "Origin, Access-Control-Request-Headers")
        return response

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """`on_response_prepare` hook: the CORS headers of an answer to an allowed origin."""
        origin = request.headers.get("Origin")
        if origin is None:
            return
        allowed = self.allow_origin(request.path, origin)
        if allowed is None:
            return
        response.headers["Access-Control-Allow-Origin"] = allowed
        if allowed != "*" and "Origin" not in response.headers.getall("Vary", []):
            response.headers.add("Vary", "Origin")
        if not request.path.startswith(STREAM_PREFIX):
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_API_HEADERS


def cors_middleware(policy: CorsPolicy) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if (
            request.method == "OPTIONS"
            and origin is not None
            and "Access-Control-Request-Method" in request.headers
        ):
            return policy.preflight(request, origin)
        return await handler(request)

    return middleware
