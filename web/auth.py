"""Accounts (AUTH=password): sign in, sign up, sign out. Off by default (anonymous identities)."""

from __future__ import annotations

from urllib.parse import urlparse

from fasthtml.common import APIRouter
from starlette.requests import Request
from starlette.responses import RedirectResponse

from chat import accounts
from components.auth import AuthPage
from web.views import full_page, settings, store

ar = APIRouter()


def _safe_next(url: str) -> str:
    """Only same-site paths: a login link must not redirect people elsewhere."""
    parsed = urlparse(url or "/")
    if parsed.scheme or parsed.netloc or not (url or "/").startswith("/") or url.startswith("//"):
        return "/"
    return url


@ar("/login", methods=["get"])
async def login_page(req: Request, next: str = "/"):
    """The sign-in form."""
    return AuthPage(
        mode="login",
        action=login.to(),
        other_url=signup_page.to() if settings(req).signup_open else None,
        next_url=_safe_next(next),
    )


@ar("/login", methods=["post"])
async def login(req: Request, session, username: str = "", password: str = "", next: str = "/"):
    """Check the password; on success start a fresh session for the account."""
    user = accounts.authenticate(store(req), username.strip(), password)
    if user is None:
        page = AuthPage(
            mode="login",
            action=login.to(),
            other_url=signup_page.to() if settings(req).signup_open else None,
            error="Wrong username or password.",
            username=username,
            next_url=_safe_next(next),
        )
        return full_page(page, 401)
    session.clear()  # no session fixation: nothing from before signing in carries over
    session["user"] = user["id"]
    session["username"] = user["username"]
    return RedirectResponse(_safe_next(next), status_code=303)


@ar("/signup", methods=["get"])
async def signup_page(req: Request):
    """The sign-up form (404 when sign-up is closed)."""
    if not settings(req).signup_open:
        return RedirectResponse(login_page.to(), status_code=303)
    return AuthPage(mode="signup", action=signup.to(), other_url=login_page.to())


@ar("/signup", methods=["post"])
async def signup(req: Request, session, username: str = "", password: str = ""):
    """Create an account and sign in."""
    if not settings(req).signup_open:
        return RedirectResponse(login_page.to(), status_code=303)
    username = username.strip()
    problem = accounts.signup_problem(username, password)
    user = None if problem else accounts.create(store(req), username, password)
    if user is None:
        page = AuthPage(
            mode="signup",
            action=signup.to(),
            other_url=login_page.to(),
            error=problem or "That username is taken.",
            username=username,
        )
        return full_page(page, 422)
    session.clear()
    session["user"] = user["id"]
    session["username"] = user["username"]
    return RedirectResponse("/", status_code=303)


@ar("/logout", methods=["post"])
async def logout(req: Request, session):
    """Sign out."""
    session.clear()
    return RedirectResponse(login_page.to(), status_code=303)
