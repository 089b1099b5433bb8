"""What guards the review page: it shows photos of people's families.

* Every request needs the session cookie. The cookie is given once, in exchange for the random
  token of the address printed at start (as Jupyter does), or for the configured password on the
  login form. Token and password are compared in constant time.
* On a loopback address, only requests for a loopback name (Host: 127.0.0.1, localhost, ::1).
* Every POST (every request that changes something) carries the page's CSRF token in its form;
  other methods than GET, HEAD and POST are refused. The cookie is SameSite=Strict and HttpOnly.
* Responses forbid framing, sniffing, referrers (the token is in the first address) and any
  script or style that does not come from the page itself (Content-Security-Policy).
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlencode

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "organizer_session"
LOGIN = "/login"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self';"
                               " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


class Secrets:
    """The secrets of one server run: new ones at every start (a restart logs everyone out)."""

    def __init__(self, password: str | None = None, hosts: frozenset[str] | None = None):
        self.token = secrets.token_urlsafe(24)  # in the printed address (unused with a password)
        self.session = secrets.token_urlsafe(32)  # the cookie's value
        self.csrf = secrets.token_urlsafe(32)  # in every form
        self.password = password
        # the only Host names accepted (None: any). On 127.0.0.1 only the loopback names: a page
        # of another site whose name is made to point at 127.0.0.1 (DNS rebinding) is refused
        self.hosts = hosts


def give_cookie(response: Response, keys: Secrets) -> None:
    """The session cookie: HttpOnly (no script reads it), SameSite=Strict (no other site's page
    sends it along)."""
    response.set_cookie(COOKIE, keys.session, httponly=True, samesite="strict", path="/")


class Guard:
    """ASGI middleware: lets a request through only with the session cookie (see the module)."""

    def __init__(self, app: ASGIApp, keys: Secrets):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        response = self._check(request)
        if response is None:
            await self.app(scope, receive, self._with_headers(send))
        else:
            await response(scope, receive, self._with_headers(send))

    def _check(self, request: Request) -> Response | None:
        if request.method not in ("GET", "HEAD", "POST"):
            return PlainTextResponse("method not allowed", 405)
        keys = self.keys
        if keys.hosts is not None and request.url.hostname not in keys.hosts:
            return PlainTextResponse("unexpected Host: open the address printed when the page was started", 400)
        token = request.query_params.get("token")
        if token is not None and keys.password is None:
            if not same(token, keys.token):
                return PlainTextResponse("wrong token: open the address printed when the page was started", 403)
            # the token is exchanged for the cookie once; the address bar then drops it
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = URL(path=request.url.path, query=urlencode(rest))
            response = RedirectResponse(str(target), 303)
            give_cookie(response, keys)
            return response
        if same(request.cookies.get(COOKIE), keys.session):
            return None
        if keys.password is not None:
            if request.url.path == LOGIN:
                return None  # the login form itself (its POST checks the password)
            if request.method in ("GET", "HEAD"):
                return RedirectResponse(LOGIN, 303)
            return PlainTextResponse("log in first", 403)
        return PlainTextResponse("not allowed: open the address printed when the page was started "
                                 "(it holds the token)", 403)

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def wrapped(message):
            if message["type"] == "http.response.start":
                present = {bytes(k).lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()
                         if k.lower().encode() not in present]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)
        return wrapped
