"""The page shell: head assets, sidebar, header, message list and composer."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from fastcore.xml import FT
from fasthtml.common import (
    H1,
    H2,
    A,
    Aside,
    Button,
    Div,
    Form,
    Header,
    Input,
    Label,
    Li,
    Link,
    Main,
    Meta,
    Nav,
    P,
    Script,
    Span,
    Textarea,
    Ul,
)

HTMX_CONFIG = {
    "selfRequestsOnly": True,
    "allowScriptTags": False,
    "allowEval": False,
    "historyCacheSize": 0,
    "includeIndicatorStyles": False,
    # Error answers (422 bad input, 404, 413, 429, 503) carry a message to show, so swap them.
    "responseHandling": [
        {"code": "204", "swap": False},
        {"code": "[23]..", "swap": True},
        {"code": "[45]..", "swap": True, "error": True},
    ],
}


def Head(static: str = "/static") -> tuple:
    """Everything in <head>: our own CSS and scripts only, no other origin."""
    return (
        Meta(charset="utf-8"),
        Meta(name="viewport", content="width=device-width, initial-scale=1"),
        Meta(name="color-scheme", content="light dark"),
        Meta(name="htmx-config", content=json.dumps(HTMX_CONFIG)),
        Link(rel="icon", href=f"{static}/favicon.svg", type="image/svg+xml"),
        Link(rel="stylesheet", href=f"{static}/app.css"),
        Link(rel="stylesheet", href=f"{static}/pygments.css"),
        Script(src=f"{static}/vendor/htmx-2.0.11.min.js", defer=True),
        Script(src=f"{static}/vendor/htmx-ext-sse-2.2.4.min.js", defer=True),
        Script(src=f"{static}/app.js", defer=True),
    )


def group_label(stamp: str, today: datetime | None = None) -> str:
    """'Today', 'Yesterday' or 'Earlier' for an ISO timestamp."""
    today = (today or datetime.now(UTC)).date()
    day = datetime.fromisoformat(stamp).date()
    if day == today:
        return "Today"
    if day == today - timedelta(days=1):
        return "Yesterday"
    return "Earlier"


def ConversationLink(conv: dict, url: str, *, current: bool = False) -> FT:
    """One conversation in the sidebar."""
    return Li(
        A(
            conv["title"] or "New conversation",
            href=url,
            aria_current="page" if current else None,
        ),
        id=f"conv-{conv['id']}",
    )


def Sidebar(conversations: list[dict], urls: dict[str, str], current: str | None) -> FT:
    """The conversation list, newest first, grouped by day, with a New chat action."""
    groups: dict[str, list] = {}
    for conv in conversations:
        groups.setdefault(group_label(conv["updated_at"]), []).append(conv)
    return Nav(
        *(
            Div(
                H2(label, cls="group"),
                Ul(
                    *(ConversationLink(c, urls[c["id"]], current=c["id"] == current) for c in convs)
                ),
            )
            for label, convs in groups.items()
        ),
        P("No conversations yet.", cls="empty") if not conversations else None,
        id="conversations",
        aria_label="Conversations",
    )


def Composer(send_url: str, cid: str | None, *, max_chars: int) -> FT:
    """The message form: Enter sends, Shift+Enter adds a line (see app.js)."""
    return Form(
        Div(id="composer-error", cls="composer-error", role="alert"),
        Div(
            Label("Message", fr="msg", cls="visually-hidden"),
            Textarea(
                id="msg",
                name="msg",
                rows=1,
                required=True,
                autofocus=True,
                maxlength=max_chars,
                placeholder="Send a message (Enter to send, Shift+Enter for a new line)",
                aria_keyshortcuts="Enter",
            ),
            Button("Send", type="submit", cls="send"),
            cls="composer-row",
        ),
        Input(type="hidden", name="cid", value=cid or "", id="cid"),
        id="composer",
        action=send_url,
        method="post",
        hx_post=send_url,
        hx_target="#messages",
        hx_swap="beforeend",
        hx_disabled_elt="find button.send",
    )


def ModelBadge(model: str | None) -> FT:
    """Which model answers; the offline demo says so plainly."""
    if not model:
        return Span(
            "Demo model (offline): set MODEL to use a real one",
            cls="badge demo",
            title="No MODEL is configured. Replies come from a built-in offline demo model.",
        )
    return Span(model, cls="badge")


def Welcome(demo: bool) -> FT:
    """The empty state of a new conversation."""
    return Div(
        H2("What can I help with?"),
        P(
            "You are talking to the built-in offline demo model. It streams a formatted reply "
            "explaining how to connect a real model."
            if demo
            else "Replies stream in as they are written, and every conversation is kept."
        ),
        id="welcome",
        cls="welcome",
    )


def Page(
    *,
    title: str,
    sidebar: FT,
    messages: tuple,
    composer: FT,
    model: str | None,
    new_url: str = "/",
) -> tuple:
    """A whole chat page: sidebar beside the conversation, composer at the bottom."""
    return (
        Div(
            Aside(
                Div(
                    A("New chat", href=new_url, cls="new-chat button"),
                    cls="sidebar-head",
                ),
                sidebar,
                id="sidebar",
                cls="sidebar",
            ),
            Main(
                Header(
                    Button(
                        "☰",
                        type="button",
                        cls="menu",
                        aria_label="Conversations",
                        aria_controls="sidebar",
                        aria_expanded="false",
                    ),
                    H1(title, id="chat-title"),
                    ModelBadge(model),
                    cls="topbar",
                ),
                Div(*messages, id="messages", cls="messages"),
                composer,
                cls="chat",
            ),
            cls="app",
        ),
    )
