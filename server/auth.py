"""API tokens: where they come from, and the middleware that checks them."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from aiohttp import web

from server.errors import Unauthenticated

log = logging.getLogger(__name__)

TOKEN_FILE = "api-token"
TOKENS_ENV = "REPLICANT_API_TOKENS"

#: Paths anyone may read: liveness, the server's own API description, and stream URLs,
#: which carry an unguessable capability token instead (a browser EventSource sends no headers).
PUBLIC_PREFIXES = ("/health-check", "/openapi.json", "/v1/streams/")


class TokenSet:
    """The accepted tokens, compared in constant time. Tokens are never logged."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens if t)
        if not self._tokens:
            raise ValueError("at least one API token is needed")

    def accepts(self, token: str) -> bool:
        candidate = token.encode()
        # Compare against every token so the time taken does not say which one nearly matched.
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(candidate, known)
        return matched


def load_tokens(configured: tuple[str, ...], data_dir: Path) -> tuple[tuple[str, ...], str | None]:
    """The tokens to accept, and a token generated just now (to print once) or None.

    Order: the configured tokens (flags or REPLICANT_API_TOKENS), else the token kept in the
    data dir, else a new one written there with owner-only permissions.
    """
    if configured:
        return configured, None
    path = data_dir / TOKEN_FILE
    if path.exists():
        return (path.read_text(encoding="utf-8").strip(),), None
    token = "r8_" + secrets.token_urlsafe(30)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return (token,), token


def tokens_from_env() -> tuple[str, ...]:
    raw = os.environ.get(TOKENS_ENV, "")
    return tuple(t.strip() for t in raw.split(",") if t.strip())


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    return None


def auth_middleware(tokens: TokenSet) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        protected = request.path.startswith("/v1/") or request.path == "/metrics"
        if request.method == "OPTIONS" or not protected:
            return await handler(request)
        if request.path.startswith(PUBLIC_PREFIXES):
            return await handler(request)
        token = bearer_token(request)
        if token is None:
            raise Unauthenticated(
                "You did not pass an authentication token. "
                "Send the header 'Authorization: Bearer <token>'."
            )
        if not tokens.accepts(token):
            raise Unauthenticated("You did not pass a valid authentication token.")
        return await handler(request)

    return middleware
