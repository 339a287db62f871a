"""The sidebar: the conversation list with rename, delete and undo, search and import."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from fastcore.xml import FT
from fasthtml.common import (
    H2,
    A,
    Br,
    Button,
    Div,
    Form,
    Input,
    Label,
    Li,
    Mark,
    Nav,
    P,
    Span,
    Strong,
    Ul,
)
from fasthtml.svg import Path, Svg


def group_label(stamp: str, today: datetime | None = None) -> str:
    """Which sidebar group a conversation last active at `stamp` (ISO) falls in: 'Today',
    'Yesterday', 'Previous 7 days', 'Previous 30 days', then its month ('November 2026')."""
    now = today or datetime.now(UTC)
    when = datetime.fromisoformat(stamp)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    days = (now.date() - when.astimezone(now.tzinfo or UTC).date()).days
    if days <= 0:
        return "Today"
    if days == 1:
        return "Yesterday"
    if days <= 7:
        return "Previous 7 days"
    if days <= 30:
        return "Previous 30 days"
    return f"{MONTHS[when.month - 1]} {when.year}"


MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip


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


def Sidebar(
    conversations: list[dict],
    links: dict[str, ConvLinks],
    current: str | None,
    today: datetime | None = None,
) -> FT:
    """The conversation list, most recently active first, grouped by when (see group_label)."""
    groups: dict[str, list] = {}
    for conv in conversations:
        groups.setdefault(group_label(conv["updated_at"], today), []).append(conv)
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
            placeholder="Search chats and messages",
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


def _marked_words(title: str, query: str) -> tuple:
    """`title` with the start of each word that a query word begins marked."""
    prefixes = [w.lower() for w in query.split() if w]
    out: list = []
    for i, word in enumerate(title.split(" ")):
        if i:
            out.append(" ")
        n = max((len(p) for p in prefixes if word.lower().startswith(p)), default=0)
        out.extend((Mark(word[:n]), word[n:]) if n else (word,))
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
                if r["turn_id"] is not None
                else Li(
                    A(
                        Strong(*_marked_words(r["title"] or "Conversation", query)),
                        Br(),
                        Span("Title", cls="hit-kind"),
                        href=u,
                    )
                )
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
