"""/v1/webhooks: the signing secret, and (for operators) the state of webhook deliveries."""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from server.errors import RequestInvalid
from server.http import base_url, json_response
from server.store import SQLITE_MAX_INT
from server.webhooks import SIGNER, WEBHOOKS, DeliveryStatus

PAGE_SIZE = 100


async def get_default_secret(request: web.Request) -> web.Response:
    """The key receivers verify `webhook-signature` with, as Replicate serves it."""
    return json_response({"key": request.app[SIGNER].secret})


def _int(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 1 <= value <= SQLITE_MAX_INT:
        raise RequestInvalid(f"{name} must be an integer from 1 to {SQLITE_MAX_INT}, not {raw!r}.")
    return value


async def list_deliveries(request: web.Request) -> web.Response:
    """Deliveries newest first: `?status=pending|delivered|failed`, `?prediction_id=`.

    `completed` webhooks are listed in every state; intermediate ones only if they failed.
    """
    raw_status = request.query.get("status")
    status = None
    if raw_status is not None:
        try:
            status = DeliveryStatus(raw_status)
        except ValueError:
            choices = ", ".join(s.value for s in DeliveryStatus)
            raise RequestInvalid(f"status must be one of {choices}, not {raw_status!r}.") from None
    limit = min(_int(request, "limit", PAGE_SIZE) or PAGE_SIZE, PAGE_SIZE)
    before = _int(request, "before", None)
    rows = await request.app[WEBHOOKS].outbox.listing(
        status=status,
        limit=limit + 1,
        before_seq=before,
        prediction_id=request.query.get("prediction_id"),
    )
    next_url = None
    if len(rows) > limit:
        rows = rows[:limit]
        params = {k: v for k, v in request.query.items() if k != "before"}
        params["before"] = str(rows[-1].seq)
        next_url = f"{base_url(request)}/v1/webhooks/deliveries?{urlencode(params)}"
    return json_response({"next": next_url, "results": [row.to_json() for row in rows]})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/webhooks/default/secret", get_default_secret)
    app.router.add_get("/v1/webhooks/deliveries", list_deliveries)
