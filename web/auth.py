"""Accounts (AUTH=password): sign in, sign up, sign out. Off by default (anonymous identities)."""

from __future__ import annotations

from urllib.parse import urlparse

from fasthtml.common import APIRouter
from starlette.requests import Request
from starlette.responses import RedirectResponse

from chat import accounts
from chat.accounts import SignInRefused
from components.auth import AuthPage
from web import links
from web.request import settings, store
from web.responses import full_page

ar = APIRouter()


def _safe_next(url: str) -> str:
    """Only same-site paths: a login link must not redirect people elsewhere."""
    url = url or "/"
    # Browsers treat a backslash like a slash and drop tabs and newlines, so "/\\evil.example"
    # or "/\t/evil.example" would leave the site; such paths are never ours anyway.
    if any(c in url for c in "\\\t\r\n") or not url.startswith("/") or url.startswith("//"):
        return "/"
    parsed = urlparse(url)
    if parsed.scheme or parsed.netloc:
        return "/"
    return url


def _start_session(session, user: dict) -> None:
    session.clear()  # no session fixation: nothing from before signing in carries over
    session["user"] = user["id"]
    session["username"] = user["username"]
    # Checked on every request: logging out or a new password raises it, ending this session.
    session["sv"] = user.get("session_version") or 0


@ar(links.LOGIN, methods=["get"])
async def login_page(req: Request, next: str = "/"):
    """The sign-in form."""
    return AuthPage(
        mode="login",
        action=login.to(),
        other_url=signup_page.to() if settings(req).signup_open else None,
        next_url=_safe_next(next),
    )


@ar(links.LOGIN, methods=["post"])
async def login(req: Request, session, username: str = "", password: str = "", next: str = "/"):
    """Check the password; on success start a fresh session for the account."""
    address = req.client.host if req.client else "unknown"
    try:
        user = await accounts.sign_in(
            store(req), username.strip(), password, address, settings(req).login_attempts
        )
    except SignInRefused as refused:
        page = AuthPage(
            mode="login",
            action=login.to(),
            other_url=signup_page.to() if settings(req).signup_open else None,
            error=refused.message,
            username=username[:40],
            next_url=_safe_next(next),
        )
        response = full_page(page, refused.status)
        if refused.retry_after:
            response.headers["Retry-After"] = str(refused.retry_after)
        return response
    _start_session(session, user)
    return RedirectResponse(_safe_next(next), status_code=303)


@ar(links.SIGNUP, methods=["get"])
async def signup_page(req: Request):
    """The sign-up form (redirects to sign-in when sign-up is closed)."""
    if not settings(req).signup_open:
        return RedirectResponse(login_page.to(), status_code=303)
    return AuthPage(mode="signup", action=signup.to(), other_url=login_page.to())


@ar(links.SIGNUP, methods=["post"])
async def signup(req: Request, session, username: str = "", password: str = ""):
    """Create an account and sign in."""
    if not settings(req).signup_open:
        return RedirectResponse(login_page.to(), status_code=303)
    username = username.strip()
    try:
        user = await accounts.sign_up(store(req), username, password)
    except SignInRefused as refused:
        page = AuthPage(
            mode="signup",
            action=signup.to(),
            other_url=login_page.to(),
            error=refused.message,
            username=username[:40],
        )
        return full_page(page, refused.status)
    _start_session(session, user)
    return RedirectResponse("/", status_code=303)


@ar(links.LOGOUT, methods=["post"])
async def logout(req: Request, session):
    """Sign out: this session, and any copy of its cookie, stops working."""
    if user_id := session.get("user"):
        # Sessions are cookies; only a server-side version makes a copied one stop working.
        store(req).end_sessions(user_id)
    session.clear()
    return RedirectResponse(login_page.to(), status_code=303)
