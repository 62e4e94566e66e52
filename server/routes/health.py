"""/health-check: always answers, even while models load or run (never blocks on them)."""

from __future__ import annotations

from aiohttp import web

from server import __version__, keys
from server.http import json_response
from server.runner import RunnerState


def overall_status(states: list[RunnerState], busy: bool) -> str:
    if any(s is RunnerState.SETUP_FAILED for s in states):
        return "SETUP_FAILED"
    if any(s is RunnerState.STARTING for s in states):
        return "STARTING"
    if any(s is RunnerState.DEFUNCT for s in states):
        return "DEFUNCT"
    return "BUSY" if busy else "READY"


async def health_check(request: web.Request) -> web.Response:
    runners = request.app[keys.RUNNERS]
    models = {name: dict(r.describe()) for name, r in runners.items()}
    status = overall_status(
        [r.state for r in runners.values()], any(r.full for r in runners.values())
    )
    return json_response({"status": status, "version": __version__, "models": models})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/health-check", health_check)
