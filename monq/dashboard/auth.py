"""The dashboard's token: derived from the cluster key, checked on every request.

Like Jupyter's, the URL that ``monq dashboard`` prints carries ``?token=...``;
the first page load trades it for an HttpOnly, SameSite=Strict cookie and
redirects to the same page without it, so the token stays out of the
address bar, the history and any Referer.  Scripts may send it as
``Authorization: Bearer <token>`` or ``?token=`` instead.

The token is ``HMAC-SHA256(cluster key, "monq-dashboard")``, hex, 32 chars:
whoever holds the connection file can compute it, nobody else can, and it
reveals nothing about the key itself.  Without a cluster key (post-mortem on
a bare database file) the server makes a random one at start.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import urllib.parse
from typing import Any

from starlette.datastructures import URL, Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["TokenMiddleware", "cookie_name", "random_token", "token_for_key"]

_TOKEN_LEN = 32
#: sent with every response: nothing loads from elsewhere, nothing frames the page
SECURITY_HEADERS = {
    "content-security-policy": ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                                "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def token_for_key(key: bytes) -> str:
    """The dashboard token of the cluster whose key is ``key``."""
    return hmac.new(key, b"monq-dashboard", hashlib.sha256).hexdigest()[:_TOKEN_LEN]


def random_token() -> str:
    """A token for a dashboard with no cluster key (post-mortem on a database file)."""
    return secrets.token_hex(_TOKEN_LEN // 2)


def cookie_name(token: str) -> str:
    """Named after the token, so two dashboards on one host keep their own cookies."""
    return "monq_dashboard_" + hashlib.sha256(token.encode()).hexdigest()[:10]


class TokenMiddleware:
    """Lets a request through only with the right token (query, bearer header or cookie).

    No token: 401.  A wrong one: 403.  Every response, those included,
    carries :data:`SECURITY_HEADERS`.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        if len(token) < 16:
            raise ValueError("the dashboard token must be at least 16 characters")
        self.app = app
        self.token = token
        self.cookie = cookie_name(token)

    def _ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here: refuse before the app sees one
            await send({"type": "websocket.close", "code": 1008})
            return

        async def send_secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for k, v in SECURITY_HEADERS.items():
                    if k.encode() not in present:
                        headers.append((k.encode(), v.encode()))
                message = {**message, "headers": headers}
            await send(message)

        request = Request(scope)
        from_query = request.query_params.get("token")
        auth = Headers(scope=scope).get("authorization", "")
        from_header = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        from_cookie = request.cookies.get(self.cookie)
        given = [t for t in (from_query, from_header, from_cookie) if t]
        if not given:
            await self._deny(request, 401, "this dashboard needs its token")(
                scope, receive, send_secure)
            return
        if not all(self._ok(t) for t in given):
            await self._deny(request, 403, "wrong dashboard token")(scope, receive, send_secure)
            return
        if from_query and not request.url.path.startswith("/api/") \
                and request.method in ("GET", "HEAD"):
            # trade the token in the URL for a cookie, and take it out of the address bar
            await self._to_cookie(request.url)(scope, receive, send_secure)
            return
        await self.app(scope, receive, send_secure)

    def _to_cookie(self, url: URL) -> Response:
        rest = [(k, v) for k, v in urllib.parse.parse_qsl(url.query, keep_blank_values=True)
                if k != "token"]
        target = url.path + ("?" + urllib.parse.urlencode(rest) if rest else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict",
                            path="/")
        return response

    def _deny(self, request: Request, code: int, why: str) -> Response:
        hint = ("open the URL that `monq dashboard` printed (it ends in ?token=...), "
                "or send the header 'Authorization: Bearer <token>'")
        if request.url.path.startswith("/api/"):
            body: dict[str, Any] = {"error": why, "hint": hint}
            return JSONResponse(body, status_code=code)
        return PlainTextResponse(f"monq dashboard: {why}.\n\nTo get in, {hint}.\n",
                                 status_code=code)
