"""The app's shared answers: HTML fragments, whole error pages, 404, busy, and inline errors."""

from __future__ import annotations

from fasthtml.common import H1, A, Body, Div, Html, P, Response, Title, to_xml
from fasthtml.common import Head as HtmlHead
from starlette.requests import Request

from chat.service import BUSY
from components.head import Head
from web.request import is_htmx


def html(fragment, status: int = 200, headers: dict | None = None) -> Response:
    """An HTML fragment response."""
    return Response(to_xml(fragment), status_code=status, headers=headers, media_type="text/html")


def full_page(parts: tuple, status: int) -> Response:
    """A whole HTML document with our head, for answers that are not 200 (404, 401, ...)."""
    title, *body = parts
    doc = Html(HtmlHead(title, *Head()), Body(*body), lang="en")
    return Response(to_xml(doc), status_code=status, media_type="text/html")


def not_found(req: Request, exc: Exception | None = None) -> Response:
    """404 for anything missing or not yours: the two are deliberately indistinguishable."""
    if is_htmx(req):
        return html(P("Not found.", cls="error"), 404)
    body = Div(
        H1("Not found"),
        P("There is nothing here, or it belongs to someone else."),
        A("Start a new chat", href="/"),
        cls="not-found",
    )
    return full_page((Title("Not found · Agent chat"), body), 404)


def busy(req: Request, exc: Exception | None = None) -> Response:
    """503 when the database cannot take a write (locked past its busy timeout, or read-only).

    Writes wait in a worker thread, so this costs the one request, not the server; what it was
    asked to change is unchanged.
    """
    if is_htmx(req):
        return error_fragment(BUSY, 503)
    body = Div(H1("Busy"), P(BUSY), A("Back to the chats", href="/"), cls="not-found")
    return full_page((Title("Busy · Agent chat"), body), 503)


def error_fragment(message: str, status: int, target: str = "#composer-error") -> Response:
    """A message shown in `target`; the request changed nothing and the typed text stays."""
    return html(
        P(message, cls="error"),
        status,
        {"HX-Retarget": target, "HX-Reswap": "innerHTML"},
    )
