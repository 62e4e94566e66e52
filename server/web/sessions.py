"""Playground sign-in: signed session cookies and the checks that protect page requests.

A person signs in once with an API token; the server answers with a session cookie
(`HttpOnly`, `SameSite=Strict`, `Secure` over https) whose value is signed with HMAC-SHA256
under a secret generated once into the data directory. The cookie carries when it was issued
and a fingerprint of the token it was made with, never the token itself, so:

- it expires `session_lifetime` seconds after sign-in (a shorter lifetime applies at once);
- it stops working when its token is no longer accepted (removed from REPLICANT_API_TOKENS);
- deleting the secret file signs everyone out.

Sign-out clears the cookie in that browser; a copied cookie stays valid until it expires.

Requests that change something (sign-in, sign-out, creating and cancelling predictions) must
come from the playground's own pages: the `Origin` (or `Referer`) must name this server, and
the page's JSON calls must also carry the `X-Replicant-Web` header, which no other site can
add without a CORS preflight this server never grants.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import attrs
from aiohttp import web

log = logging.getLogger(__name__)

SECRET_FILE = "web-session-secret"
COOKIE = "replicant_session"
#: Header the page's own `fetch` calls send (see the module docstring).
CSRF_HEADER = "X-Replicant-Web"
_VERSION = "v1"
#: Clock skew tolerated on the issue time of a cookie, in seconds.
_SKEW = 60


def load_secret(data_dir: Path) -> bytes:
    """The signing secret kept in the data dir; generated (owner-only) on first use."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it just now; read theirs
        else:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_hex(32) + "\n")
    secret = bytes.fromhex(path.read_text(encoding="ascii").strip())
    if len(secret) < 32:
        raise ValueError(f"{path} must hold at least 32 bytes of hex")
    return secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


@attrs.frozen
class Session:
    issued_at: int
    expires_at: int


class SessionSigner:
    """Issues and checks session cookie values (constant-time signature comparison)."""

    def __init__(
        self,
        secret: bytes,
        tokens: Iterable[str],
        *,
        lifetime: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret
        self._fingerprints = tuple(self.fingerprint(t) for t in tokens)
        self.lifetime = int(lifetime)
        self._clock = clock

    def fingerprint(self, token: str) -> str:
        """A short keyed hash naming a token without revealing it."""
        digest = hmac.new(self._secret, b"token:" + token.encode(), hashlib.sha256).digest()
        return _b64(digest[:12])

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def issue(self, token: str) -> str:
        """A cookie value for someone who just signed in with `token` (already checked)."""
        payload = f"{_VERSION}.{int(self._clock())}.{secrets.token_urlsafe(12)}"
        payload += f".{self.fingerprint(token)}"
        return f"{payload}.{self._sign(payload)}"

    def verify(self, value: str) -> Session | None:
        """The session a cookie value stands for, or None (forged, expired, token revoked)."""
        payload, _, signature = value.rpartition(".")
        if not payload or not hmac.compare_digest(self._sign(payload), signature):
            return None
        parts = payload.split(".")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[1].isdigit():
            return None
        issued = int(parts[1])
        now = self._clock()
        if issued > now + _SKEW or now >= issued + self.lifetime:
            return None
        known = False
        for fingerprint in self._fingerprints:
            known |= hmac.compare_digest(fingerprint, parts[3])
        if not known:
            return None
        return Session(issued_at=issued, expires_at=issued + self.lifetime)


def current_session(request: web.Request, signer: SessionSigner) -> Session | None:
    value = request.cookies.get(COOKIE)
    return signer.verify(value) if value else None


def set_session_cookie(
    response: web.StreamResponse, value: str, *, lifetime: int, secure: bool
) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=lifetime,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=secure or None,
    )


def clear_session_cookie(response: web.StreamResponse, *, secure: bool) -> None:
    response.set_cookie(
        COOKIE,
        "",
        max_age=0,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=secure or None,
    )


def same_origin(request: web.Request, public_url: str | None) -> bool:
    """Whether a request that changes something was sent by this server's own pages.

    The `Origin` header (else `Referer`) must name this server's host, as the browser reached
    it (`Host`) or as `--public-url` names it. A request carrying neither is refused.
    """
    source = request.headers.get("Origin")
    if not source or source == "null":
        source = request.headers.get("Referer")
    if not source:
        return False
    try:
        parts = urlsplit(source)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    claimed = parts.netloc.lower()
    allowed = {request.host.lower()}
    if public_url:
        allowed.add(urlsplit(public_url).netloc.lower())
    return claimed in allowed
