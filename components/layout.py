"""The page shell: head assets, sidebar, header, message list and composer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastcore.xml import FT
from fasthtml.common import (
    H1,
    H2,
    A,
    Aside,
    Br,
    Button,
    Details,
    Div,
    Fieldset,
    Form,
    Header,
    Input,
    Label,
    Legend,
    Li,
    Link,
    Main,
    Mark,
    Meta,
    Nav,
    Option,
    P,
    Script,
    Select,
    Span,
    Strong,
    Summary,
    Textarea,
    Ul,
)
from fasthtml.svg import Path, Svg

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
        Script(src=f"{static}/theme.js"),
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


@dataclass(frozen=True)
class ConvLinks:
    """The URLs of one conversation's sidebar controls."""

    open: str
    rename_form: str
    rename: str
    delete: str
    restore: str
    item: str


PENCIL = (
    "M3 17.25V21h3.75L17.8 9.95l-3.75-3.75L3 17.25zm17.7-10.2a1 1 0 0 0 0-1.4"
    "l-2.35-2.35a1 1 0 0 0-1.4 0l-1.85 1.85 3.75 3.75 1.85-1.85z"
)
TRASH = "M6 19a2 2 0 0 0 2 2h8a2 2 0 0 0 2-2V7H6v12zM19 4h-3.5l-1-1h-5l-1 1H5v2h14V4z"


def Icon(path: str) -> FT:
    """A small inline SVG icon (no emoji: they need fonts phones may not have)."""
    return Svg(Path(d=path), viewBox="0 0 24 24", width="18", height="18", aria_hidden="true",
               fill="currentColor", focusable="false")  # fmt: skip


def ConversationLink(conv: dict, links: ConvLinks, *, current: bool = False) -> FT:
    """One conversation in the sidebar, with rename and delete."""
    title = conv["title"] or "New conversation"
    return Li(
        A(title, href=links.open, aria_current="page" if current else None, cls="conv-link"),
        Div(
            Button(
                Icon(PENCIL),
                type="button",
                cls="icon",
                aria_label=f"Rename {title}",
                hx_get=links.rename_form,
                hx_target=f"#conv-{conv['id']}",
                hx_swap="outerHTML",
            ),
            Button(
                Icon(TRASH),
                type="button",
                cls="icon",
                aria_label=f"Delete {title}",
                hx_post=links.delete,
                hx_target=f"#conv-{conv['id']}",
                hx_swap="outerHTML",
            ),
            cls="conv-actions",
        ),
        id=f"conv-{conv['id']}",
        cls="conv",
    )


def RenameForm(conv: dict, links: ConvLinks) -> FT:
    """Rename a conversation in place (Enter saves, Esc or Cancel keeps the old name)."""
    return Li(
        Form(
            Label("Conversation title", fr=f"rename-{conv['id']}", cls="visually-hidden"),
            Input(
                id=f"rename-{conv['id']}",
                name="title",
                value=conv["title"],
                maxlength=200,
                required=True,
                autofocus=True,
            ),
            Button("Save", type="submit", cls="small"),
            Button(
                "Cancel",
                type="button",
                cls="small cancel",
                hx_get=links.item,
                hx_target=f"#conv-{conv['id']}",
                hx_swap="outerHTML",
            ),
            hx_post=links.rename,
            hx_target=f"#conv-{conv['id']}",
            hx_swap="outerHTML",
            cls="rename-form",
        ),
        id=f"conv-{conv['id']}",
        cls="conv editing",
    )


def DeletedItem(conv: dict, links: ConvLinks) -> FT:
    """What a deleted conversation leaves in the list: a way to undo."""
    return Li(
        Span(f"Deleted “{conv['title'] or 'New conversation'}”", cls="deleted"),
        Button(
            "Undo",
            type="button",
            cls="small",
            hx_post=links.restore,
            hx_target=f"#conv-{conv['id']}",
            hx_swap="outerHTML",
        ),
        id=f"conv-{conv['id']}",
        cls="conv deleted-item",
        role="status",
    )


def Sidebar(conversations: list[dict], links: dict[str, ConvLinks], current: str | None) -> FT:
    """The conversation list, newest first, grouped by day."""
    groups: dict[str, list] = {}
    for conv in conversations:
        groups.setdefault(group_label(conv["updated_at"]), []).append(conv)
    return Nav(
        *(
            Div(
                H2(label, cls="group"),
                Ul(
                    *(
                        ConversationLink(c, links[c["id"]], current=c["id"] == current)
                        for c in convs
                    )
                ),
            )
            for label, convs in groups.items()
        ),
        P("No conversations yet.", cls="empty") if not conversations else None,
        id="conversations",
        aria_label="Conversations",
    )


def SearchBox(url: str) -> FT:
    """Search across all of the user's messages; results replace the list while typing."""
    return Form(
        Label("Search messages", fr="search", cls="visually-hidden"),
        Input(
            type="search",
            id="search",
            name="q",
            placeholder="Search messages",
            autocomplete="off",
            hx_get=url,
            hx_trigger="input changed delay:250ms, search",
            hx_target="#search-results",
            hx_swap="innerHTML",
        ),
        action=url,
        method="get",
        role="search",
        cls="search",
    )


def _marked(snippet: str) -> tuple:
    """Turn FTS snippet markers (\x02 hit \x03) into <mark>, escaping everything else."""
    out: list = []
    for i, piece in enumerate(snippet.replace("\x03", "\x02").split("\x02")):
        out.append(Mark(piece) if i % 2 else piece)
    return tuple(out)


def SearchResults(query: str, results: list[dict], urls: list[str]) -> FT:
    """Search hits, each linking to its message."""
    if not query.strip():
        return Div()
    if not results:
        return P(f"No messages match “{query}”.", cls="empty", role="status")
    return Div(
        P(f"{len(results)} result{'s' if len(results) != 1 else ''}", cls="empty", role="status"),
        Ul(
            *(
                Li(A(Strong(r["title"] or "Conversation"), Br(), *_marked(r["snippet"]), href=u))
                for r, u in zip(results, urls, strict=True)
            ),
            cls="results",
        ),
    )


def ImportForm(url: str) -> FT:
    """Upload a pydantic-ai message JSON file as a new conversation."""
    return Form(
        Label("Import a conversation (.json)", fr="import-file", cls="import-label"),
        Input(type="file", id="import-file", name="file", accept=".json,application/json",
              required=True),
        Button("Import", type="submit", cls="small"),
        Div(id="import-error", role="alert"),
        hx_post=url,
        hx_encoding="multipart/form-data",
        hx_target="#import-error",
        action=url,
        method="post",
        enctype="multipart/form-data",
        cls="import",
    )  # fmt: skip


def PersonaPicker(personas: dict[str, str], current: str | None) -> FT | None:
    """Choose the persona (instruction set) for this conversation."""
    if len(personas) < 2:
        return None
    return (
        Label("Persona", fr="persona", cls="picker-label"),
        Select(
            *(Option(name, value=key, selected=key == current) for key, name in personas.items()),
            id="persona",
            name="persona",
        ),
    )


def ModelPicker(
    choices: tuple[str, ...],
    current: str,
    personas: dict[str, str] | None = None,
    persona: str | None = None,
) -> FT | None:
    """Choose model and persona for this conversation, and optionally compare several models."""
    people = PersonaPicker(personas or {}, persona)
    if len(choices) < 2:
        return Div(*people, cls="picker") if people else None
    return Div(
        *(people or ()),
        Label("Model", fr="model", cls="picker-label"),
        Select(
            *(Option(m, value=m, selected=m == current) for m in choices),
            id="model",
            name="model",
        ),
        Details(
            Summary("Compare"),
            Fieldset(
                Legend("Send the next message to several models"),
                *(
                    Label(Input(type="checkbox", name="compare", value=m), m, cls="check")
                    for m in choices
                ),
            ),
            cls="compare-pick",
        ),
        cls="picker",
    )


def Composer(
    send_url: str,
    cid: str | None,
    *,
    max_chars: int,
    choices: tuple[str, ...] = (),
    model: str = "demo",
    personas: dict[str, str] | None = None,
    persona: str | None = None,
) -> FT:
    """The message form: Enter sends, Shift+Enter adds a line (see app.js)."""
    return Form(
        ModelPicker(choices, model, personas, persona),
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
    if not model or model == "demo":
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
