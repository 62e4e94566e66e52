"""The playground's typed application keys (the API's own live in `server.keys`)."""

from __future__ import annotations

import attrs
from aiohttp import web

from server.web.sessions import SessionSigner


@attrs.frozen
class Assets:
    """URLs of the static files every page loads, with a content hash for caching."""

    css: str
    js: str


SESSIONS = web.AppKey("web_sessions", SessionSigner)
ASSETS = web.AppKey("web_assets", Assets)
