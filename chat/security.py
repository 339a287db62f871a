"""HTTP hardening: security headers on every response, refusal of cross-site writes, of Host
names that are not this site's, and of URLs carrying NUL characters."""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# With HTTPS=1: browsers refuse plain HTTP to this host for a year. No includeSubDomains, as
# other sites on sibling names may still be plain HTTP.
HSTS = "max-age=31536000"


def cross_site(headers: Headers, scheme: str) -> bool:
    """True when a state-changing request comes from another site (CSRF)."""
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return True
    origin = headers.get("origin")
    if origin is None or origin == "null":
        return origin == "null"
    host = headers.get("x-forwarded-host") or headers.get("host", "")
    return origin.split("://", 1)[-1] != host


class SecurityMiddleware:
    """Adds security headers everywhere; refuses foreign Host names, NUL in the URL (400) and
    cross-site POSTs (403)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        host_allowed: Callable[[str], bool] | None = None,
        hsts: bool = False,
    ):
        self.app = app
        self.host_allowed = host_allowed
        self.headers = {**SECURITY_HEADERS, **({"Strict-Transport-Security": HSTS} if hsts else {})}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = None
        if self.host_allowed is not None and not self.host_allowed(headers.get("host", "")):
            # DNS rebinding: a page on another site resolving its own name to this server.
            refusal = PlainTextResponse("Unknown host name for this site.", status_code=400)
        elif b"%00" in scope.get("query_string", b"") or "\x00" in scope.get("path", ""):
            # NUL is never in a valid path or search, and some libraries below refuse it.
            refusal = PlainTextResponse("Bad request: the address has a NUL character.", 400)
        elif scope["method"] not in SAFE_METHODS and cross_site(
            headers, scope.get("scheme", "http")
        ):
            refusal = PlainTextResponse("Cross-site request refused.", status_code=403)
        if refusal is not None:
            await refusal(scope, receive, self._with_headers(send))
            return
        await self.app(scope, receive, self._with_headers(send))

    def _with_headers(self, send: Send) -> Send:
        async def wrapped(message) -> None:
            if message["type"] == "http.response.start":
                add_headers(MutableHeaders(scope=message), self.headers)
            await send(message)

        return wrapped


def add_headers(headers: MutableHeaders, values: dict[str, str] = SECURITY_HEADERS) -> None:
    """Set each security header the response does not set itself."""
    for key, value in values.items():
        headers.setdefault(key, value)


SERVER_ERROR_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Something went wrong · Agent chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/app.css"></head>
<body><main class="not-found"><h1>Something went wrong</h1>
<p>The server could not answer this request. It has been logged; please try again.</p>
<p><a href="/">Back to your chats</a></p></main></body></html>
"""


def server_error(request: Request, exc: Exception) -> Response:
    """500: a plain page with the security headers, never a traceback.

    Starlette calls this outside every middleware, so the headers are set here.
    """
    if request.headers.get("hx-request") == "true":
        response = HTMLResponse(
            '<p class="error" role="alert">Something went wrong. Please try again.</p>', 500
        )
    else:
        response = HTMLResponse(SERVER_ERROR_PAGE, 500)
    hsts = getattr(getattr(request.app.state, "settings", None), "https_only", False)
    add_headers(
        response.headers,
        {**SECURITY_HEADERS, **({"Strict-Transport-Security": HSTS} if hsts else {})},
    )
    return response
