"""/v1/account: the one local account every token belongs to."""

from __future__ import annotations

from aiohttp import web

from server.http import json_response

ACCOUNT = {
    "type": "user",
    "username": "replicant",
    "name": "Local replicant account",
    "github_url": None,
}


async def get_account(request: web.Request) -> web.Response:
    return json_response(ACCOUNT)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/account", get_account)
