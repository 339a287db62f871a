"""The page shell: the sidebar beside the conversation, header, message list and composer."""

from __future__ import annotations

from fastcore.xml import FT
from fasthtml.common import (
    H1,
    H2,
    A,
    Aside,
    Button,
    Dd,
    Dialog,
    Div,
    Dl,
    Dt,
    Form,
    Header,
    Kbd,
    Main,
    P,
)

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


def MoreButton() -> FT:
    """On small screens, opens the header's second row (token total, export) as a panel."""
    return Button(
        "⋯",
        type="button",
        cls="icon more",
        aria_label="Conversation details",
        aria_controls="topbar-more",
        aria_expanded="false",
    )


def JumpToLatest() -> FT:
    """Shown while the reader is scrolled up from the newest message (see app.js)."""
    return Div(
        Button(
            "↓ Latest",
            type="button",
            id="jump-latest",
            cls="jump-latest small",
            aria_label="Jump to latest message",
            hidden=True,
        ),
        cls="jump-wrap",
    )


# What app.js answers to: (the keys as shown, what they do).
SHORTCUTS = (
    ("Ctrl/⌘ + Shift + O", "New chat"),
    ("Ctrl/⌘ + K  or  /", "Search messages"),
    ("Esc", "Stop the reply being written"),
    ("Enter", "Send (on a touch screen: a new line; Ctrl/⌘ + Enter sends)"),
    ("Shift + Enter", "New line"),
    ("?  or  Ctrl/⌘ + /", "Show these shortcuts"),
)


def ShortcutsButton() -> FT:
    """Opens the keyboard shortcuts dialog."""
    return Button(
        "Keyboard shortcuts",
        type="button",
        cls="small shortcuts-open",
        aria_haspopup="dialog",
        aria_controls="shortcuts",
        aria_keyshortcuts="? Control+/",
    )


def ShortcutsDialog() -> FT:
    """The keyboard shortcuts, in a modal <dialog> (focus stays inside; Esc closes it)."""
    return Dialog(
        Div(
            H2("Keyboard shortcuts", id="shortcuts-title"),
            Dl(*(part for keys, what in SHORTCUTS for part in (Dt(Kbd(keys)), Dd(what)))),
            Form(Button("Close", type="submit", cls="small"), method="dialog"),
            cls="shortcuts-body",  # the dialog's padding: a click outside it is on the backdrop
        ),
        id="shortcuts",
        cls="shortcuts",
        aria_labelledby="shortcuts-title",
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
                ShortcutsButton(),
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
                    MoreButton(),
                    Div(
                        usage,
                        export or Div(id="export", cls="export"),
                        id="topbar-more",
                        cls="topbar-more",
                    ),
                    ThemeToggle(),
                    cls="topbar",
                ),
                Div(*messages, id="messages", cls="messages"),
                JumpToLatest(),
                composer,
                cls="chat",
            ),
            cls="app",
        ),
        ShortcutsDialog(),
    )
