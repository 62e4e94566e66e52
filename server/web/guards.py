"""Who may see a playground page and who may change something: the wrappers of every route.

`page` wraps an HTML page: without a session the sign-in form is shown in its place, and a
POST must come from this server's own pages. `page_api` wraps a JSON call of the pages'
script: session cookie, `X-Replicant-Web` header and (for POST) this server's origin, or a
problem+json error. Both send the security headers below.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from server import keys
from server.errors import ApiError
from server.http import base_url
from server.web import templates
from server.web.appkeys import ASSETS, SESSIONS
from server.web.html import Markup
from server.web.sessions import COOKIE, CSRF_HEADER, current_session, same_origin

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SAFE_METHODS = ("GET", "HEAD")
#: Pages load only this server's own scripts and styles; output images may come from anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: https: http:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
CROSS_SITE = (
    "This request did not come from this server's own pages, so it was not carried out. "
    "Reload the page and try again."
)


class Forbidden(ApiError):
    status = 403
    title = "Forbidden"


class SignInRequired(ApiError):
    status = 401
    title = "Unauthenticated"


def page_context(request: web.Request, *, signed_in: bool) -> templates.PageContext:
    assets = request.app[ASSETS]
    return templates.PageContext(css_url=assets.css, js_url=assets.js, signed_in=signed_in)


def html_response(body: Markup, *, status: int = 200) -> web.Response:
    return web.Response(
        text=body, status=status, content_type="text/html", headers=SECURITY_HEADERS
    )


def redirect(location: str) -> web.Response:
    """A 303 to a path on this server (after a form post: the browser then GETs it)."""
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


def from_this_site(request: web.Request) -> bool:
    return same_origin(request, request.app[keys.CONFIG].public_url)


def refused_cross_site(request: web.Request) -> web.Response:
    ctx = page_context(request, signed_in=False)
    return html_response(templates.message_page(ctx, "Request refused", CROSS_SITE), status=403)


def secure_cookies(request: web.Request) -> bool:
    """Whether people reach this server over https (then cookies are `Secure`)."""
    return base_url(request).startswith("https:")


def page(handler: Handler) -> Handler:
    """An HTML page for signed-in people; anyone else gets the sign-in form in its place.

    A link followed from another site arrives without the SameSite=Strict cookie; such a
    visit gets a page that reloads itself, which is a same-site navigation and carries it.
    Domain errors (a prediction not found, ...) become HTML error pages.
    """

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if request.method not in SAFE_METHODS and not from_this_site(request):
            return refused_cross_site(request)
        if current_session(request, request.app[SESSIONS]) is None:
            ctx = page_context(request, signed_in=False)
            if (
                request.method in SAFE_METHODS
                and request.headers.get("Sec-Fetch-Site") == "cross-site"
                and COOKIE not in request.cookies
            ):
                return html_response(templates.continue_page(ctx, request.path_qs))
            login = templates.login_page(ctx, next_path=request.path_qs)
            return html_response(login, status=401)
        try:
            return await handler(request)
        except ApiError as exc:
            ctx = page_context(request, signed_in=True)
            message = templates.message_page(ctx, exc.title, exc.detail)
            return html_response(message, status=exc.status)

    return wrapped


def page_api(handler: Handler) -> Handler:
    """A JSON call of the pages' script: the session cookie and the custom header, and for a
    POST this server's origin; problem+json otherwise. Bearer tokens are not accepted."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if request.headers.get(CSRF_HEADER) != "1":
            raise Forbidden(f"Playground calls must carry the header {CSRF_HEADER}: 1.")
        if request.method not in SAFE_METHODS and not from_this_site(request):
            raise Forbidden(CROSS_SITE)
        if current_session(request, request.app[SESSIONS]) is None:
            raise SignInRequired("Your playground session has ended; sign in again.")
        response = await handler(request)
        response.headers.update({"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
        return response

    return wrapped
