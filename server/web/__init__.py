"""The web playground: pages at `urls.web`, forms made from each model's schema.

`setup(app, tokens)` adds everything to the application: the pages and their JSON calls
(`server.web.routes`), the static files, and the session signer (`server.web.sessions`).
See docs/playground.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from server import keys
from server.web.appkeys import ASSETS, SESSIONS, Assets
from server.web.routes import setup_routes
from server.web.sessions import SessionSigner, load_secret

STATIC_DIR = Path(__file__).resolve().parent / "static"


def setup(app: web.Application, tokens: Iterable[str]) -> None:
    """Serve the playground; sessions can be opened with any of `tokens`."""
    config = app[keys.CONFIG]
    app[SESSIONS] = SessionSigner(
        load_secret(config.data_dir), tokens, lifetime=config.session_lifetime
    )
    static = app.router.add_static("/static/", STATIC_DIR, name="web-static")
    assert isinstance(static, web.StaticResource)
    app[ASSETS] = Assets(
        css=str(static.url_for(filename="playground.css", append_version=True)),
        js=str(static.url_for(filename="playground.js", append_version=True)),
    )
    setup_routes(app)
