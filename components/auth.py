"""Sign-in and sign-up pages (AUTH=password)."""

from __future__ import annotations

from fastcore.xml import FT
from fasthtml.common import H1, A, Button, Div, Form, Input, Label, Main, P, Title


def AuthPage(
    *,
    mode: str,
    action: str,
    other_url: str | None,
    error: str | None = None,
    username: str = "",
    next_url: str = "/",
) -> tuple:
    """The sign-in (mode='login') or sign-up (mode='signup') page."""
    login = mode == "login"
    heading = "Sign in" if login else "Create an account"
    return (
        Title(f"{heading} · Agent chat"),
        Main(
            H1(heading),
            P(error, cls="error", role="alert") if error else None,
            Form(
                Label("Username", fr="username"),
                Input(id="username", name="username", value=username, required=True,
                      autocomplete="username", autofocus=True, maxlength=40),
                Label("Password", fr="password"),
                Input(id="password", name="password", type="password", required=True,
                      autocomplete="current-password" if login else "new-password",
                      minlength=None if login else 10, maxlength=1024),
                Input(type="hidden", name="next", value=next_url),
                Button(heading, type="submit", cls="send"),
                action=action,
                method="post",
                cls="auth-form",
            ),
            _other(login, other_url),
            cls="auth",
        ),
    )  # fmt: skip


def _other(login: bool, url: str | None) -> FT | None:
    if url is None:
        return P("New accounts are closed on this site.", cls="note") if login else None
    if login:
        return P("No account yet? ", A("Create one", href=url))
    return P("Have an account? ", A("Sign in", href=url))


def SignOut(action: str, username: str) -> FT:
    """Who is signed in, with a sign-out button."""
    return Form(
        Div(username, cls="who"),
        Button("Sign out", type="submit", cls="small"),
        action=action,
        method="post",
        cls="signout",
    )
