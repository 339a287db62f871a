"""The page shell: the sidebar beside the conversation, header, message list and composer."""

from __future__ import annotations

from fastcore.xml import FT
from fasthtml.common import H1, H2, A, Aside, Button, Div, Header, Main, P

from components.composer import ModelBadge
from components.sidebar import ImportForm, SearchBox


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


def ThemeToggle() -> FT:
    """Cycles the colour theme: system, light, dark (remembered by app.js)."""
    return Button(
        "◐",
        type="button",
        cls="icon theme",
        aria_label="Colour theme: system",
        data_theme_toggle="",
    )


def ExportLinks(md_url: str, json_url: str) -> FT:
    """Download the conversation as Markdown or as pydantic-ai messages."""
    return Div(
        A("Markdown", href=md_url, download=True, cls="button small"),
        A("JSON", href=json_url, download=True, cls="button small"),
        cls="export",
        id="export",
        role="group",
        aria_label="Export conversation",
    )


def Page(
    *,
    title: str,
    sidebar: FT,
    messages: tuple,
    composer: FT,
    model: str | None,
    new_url: str = "/",
    search_url: str = "/search",
    import_url: str = "/import",
    export: FT | None = None,
    usage: FT | None = None,
    account: FT | None = None,
) -> tuple:
    """A whole chat page: sidebar beside the conversation, composer at the bottom."""
    return (
        Div(
            Aside(
                Div(
                    A("New chat", href=new_url, cls="new-chat button"),
                    SearchBox(search_url),
                    cls="sidebar-head",
                ),
                Div(id="search-results", cls="search-results", aria_live="polite"),
                sidebar,
                ImportForm(import_url),
                account,
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
                    usage,
                    export or Div(id="export", cls="export"),
                    ThemeToggle(),
                    cls="topbar",
                ),
                Div(*messages, id="messages", cls="messages"),
                composer,
                cls="chat",
            ),
            cls="app",
        ),
    )
