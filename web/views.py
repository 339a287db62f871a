"""View assembly: how stored conversations become components (messages, pages of a branch,
the sidebar, the whole chat page), with the rendered-HTML cache that makes them cheap."""

from __future__ import annotations

import json
import time

from fastcore.xml import FT
from fasthtml.common import H1, Div, Input, Title
from starlette.requests import Request

from chat.markdown import RENDER_BUDGET, RENDER_VERSION, plain, render
from chat.reply import segments
from chat.store import load_messages
from components.attachments import AttachButton
from components.auth import SignOut
from components.composer import Composer
from components.layout import Page, Welcome
from components.messages import (
    AssistantMessage,
    CompareColumns,
    ConversationUsage,
    LoadEarlier,
    LoadLater,
    SafeHTML,
    Segments,
    TurnLinks,
    UserMessage,
)
from components.sidebar import Sidebar
from web import links
from web.links import conv_links, export_links, turn_links, url
from web.request import runs, settings, store, uid

# Rendering a page's replies may take this long in all; the rest are shown as plain text (and
# not cached as such: the next view renders them properly).
PAGE_RENDER_BUDGET = 2.0


def load_json(raw: str | None) -> dict | None:
    """Parse a JSON column that may be empty."""
    return json.loads(raw) if raw else None


def _uses_tools(turn: dict) -> bool:
    return '"tool-call"' in turn["messages"]  # cheap check first: most replies are text only


def reply_body(turn: dict) -> tuple:
    """A stored reply's content: rebuilt from its messages when it used tools."""
    if _uses_tools(turn):
        parts = segments(load_messages(turn["messages"]), turn["reply_text"])
        return Segments([render(s) if isinstance(s, str) else s for s in parts])
    html = _cached_html(turn)
    if html is None:
        html = render(turn["reply_text"])
    return (SafeHTML(html),) if html else ()


def _cached_html(turn: dict) -> str | None:
    if turn.get("reply_html_version") == RENDER_VERSION and turn.get("reply_html") is not None:
        return turn["reply_html"]
    return None


def render_cached(req: Request, turns: list[dict]) -> None:
    """Render the finished text-only replies in `turns` that have no cached HTML, and cache it.

    Rendering (markdown, highlighting, sanitizing) is most of the cost of showing a stored reply,
    and a finished reply never changes: each is rendered once, when first shown. The cache write
    is best-effort (the store skips it when the database is busy or read-only): reading a page
    never needs a write. The page's rendering has a budget too, beyond each reply's own.
    """
    deadline = time.perf_counter() + PAGE_RENDER_BUDGET
    fresh = []
    for turn in turns:
        if turn["status"] == "streaming" or _uses_tools(turn) or _cached_html(turn) is not None:
            continue
        left = deadline - time.perf_counter()
        # (The version is set for this request's copy of the row, so `reply_body` uses it.)
        turn["reply_html_version"] = RENDER_VERSION
        if left <= 0:
            turn["reply_html"] = plain(turn["reply_text"])
            continue
        turn["reply_html"] = render(turn["reply_text"], budget=min(RENDER_BUDGET, left))
        fresh.append((turn["id"], turn["reply_html"]))
    store(req).cache_html(fresh, RENDER_VERSION)


def reply(req: Request, turn: dict, links: TurnLinks, *, last: bool) -> FT:
    """A turn's reply: live placeholder while its run goes on, else rendered from storage."""
    tid = turn["id"]
    if runs(req).live(turn):
        return AssistantMessage(tid, links=links, live=True)
    return AssistantMessage(
        tid,
        body=reply_body(turn),
        status=turn["status"],
        links=links,
        error=turn["error"],
        usage=load_json(turn["usage"]),
        model=turn["model"],
        last=last,
        feedback=turn.get("feedback"),
        when=turn.get("finished_at") or turn.get("created_at"),
    )


def message_items(req: Request, conv: dict, turns: list[dict]) -> tuple:
    """User messages and replies for `turns`, in order."""
    parents = {t["parent_id"] for t in turns}
    siblings = store(req).siblings(conv["id"], parents) if turns else {}
    groups = store(req).comparisons(t["compare_group"] for t in turns if t.get("compare_group"))
    # The replies shown beside a branch's turn: the same rows where they are the same turn.
    on_branch = {t["id"]: t for t in turns}
    others = [t for g in groups.values() for t in g if t["id"] not in on_branch]
    groups = {k: [on_branch.get(t["id"], t) for t in g] for k, g in groups.items()}
    render_cached(req, [*turns, *others])
    items: list = []
    for turn in turns:
        links = turn_links(turn, siblings)
        items.append(UserMessage(turn, links))
        if group := groups.get(turn.get("compare_group")):
            items.append(_comparison(req, conv, turn, group, siblings))
        else:
            items.append(reply(req, turn, links, last=turn["id"] == conv["head_turn_id"]))
    return tuple(items)


def _comparison(req: Request, conv: dict, shown: dict, group: list[dict], siblings) -> FT:
    """A message sent to several models: its replies side by side, the one continued marked."""
    columns = []
    for t in group:
        kept = t["id"] == shown["id"]
        body = reply(req, t, turn_links(t, siblings), last=t["id"] == conv["head_turn_id"])
        keep = None if kept else url(links.SHOW, cid=conv["id"], tid=t["id"])
        columns.append((t["model"] or "demo", body, keep))
    return CompareColumns(columns)


def window(req: Request, conv: dict, head: int | None) -> tuple:
    """The newest page of the branch ending at `head`, with a link to load earlier ones."""
    page_size = settings(req).history_page
    turns = store(req).branch(head, limit=page_size + 1)
    more = len(turns) > page_size
    turns = turns[-page_size:]
    items = message_items(req, conv, turns)
    return (_earlier(conv, turns), *items) if more else items


def window_at(req: Request, conv: dict, at: dict) -> tuple:
    """A page of the branch shown for turn `at` (`conv`'s head is its leaf), centred on it."""
    page_size = settings(req).history_page
    before = store(req).branch(at["id"], limit=page_size // 2 + 2)  # ends with `at`
    more_before = len(before) > page_size // 2 + 1
    before = before[-(page_size // 2 + 1) :]
    after = store(req).later(at["id"], limit=page_size - len(before) + 1)
    more_after = len(after) > page_size - len(before)
    turns = before + after[: page_size - len(before)]
    items = message_items(req, conv, turns)
    return (
        *((_earlier(conv, turns),) if more_before else ()),
        *items,
        *((_later(conv, turns),) if more_after else ()),
    )


def later_page(req: Request, conv: dict, after: dict) -> tuple:
    """The page of turns after `after` on the branch shown for it, and a link to the next."""
    page_size = settings(req).history_page
    turns = store(req).later(after["id"], limit=page_size + 1)
    more = len(turns) > page_size
    turns = turns[:page_size]
    items = message_items(req, conv, turns)
    return (*items, _later(conv, turns)) if more else items


def _earlier(conv: dict, turns: list[dict]) -> FT:
    return LoadEarlier(url(links.OLDER, cid=conv["id"], before=turns[0]["id"]))


def _later(conv: dict, turns: list[dict]) -> FT:
    return LoadLater(url(links.NEWER, cid=conv["id"], after=turns[-1]["id"]))


def messages_view(req: Request, conv: dict) -> tuple:
    """The newest page of a conversation's current branch."""
    return window(req, conv, conv["head_turn_id"])


def sidebar(req: Request, current: str | None) -> FT:
    """The conversation list for the current user."""
    convs = store(req).conversations(uid(req))
    return Sidebar(convs, {c["id"]: conv_links(c["id"]) for c in convs}, current)


def _account(req: Request) -> FT | None:
    if settings(req).auth != "password":
        return None
    return SignOut(links.LOGOUT, req.scope.get("session", {}).get("username", ""))


def new_chat_updates(req: Request) -> tuple:
    """Out-of-band updates that turn the open page into a new chat (its conversation is gone)."""
    return (
        Div(Welcome(settings(req).demo), id="messages", cls="messages", hx_swap_oob="true"),
        Input(type="hidden", name="cid", value="", id="cid", hx_swap_oob="true"),
        H1("New chat", id="chat-title", hx_swap_oob="true"),
        Title("New chat · Agent chat"),
        Div(id="export", cls="export", hx_swap_oob="true"),
        ConversationUsage(None, oob=True),
    )


def page(req: Request, conv: dict | None, *, items: tuple | None = None) -> tuple:
    """A whole chat page, for a conversation or for a new chat."""
    cfg = settings(req)
    cid = conv["id"] if conv else None
    if items is None:
        items = messages_view(req, conv) if conv else (Welcome(cfg.demo),)
    title = conv["title"] if conv and conv["title"] else "New chat"
    model = (conv or {}).get("model") or cfg.default_model
    return (
        Title(f"{title} · Agent chat"),
        *Page(
            title=title,
            sidebar=sidebar(req, cid),
            messages=items,
            composer=Composer(
                links.SEND,
                cid,
                max_chars=cfg.max_message_chars,
                choices=cfg.choices,
                model=model,
                personas={k: p.name for k, p in runs(req).personas.items()},
                persona=(conv or {}).get("persona") or next(iter(runs(req).personas)),
                attach=AttachButton(
                    links.ATTACHMENTS,
                    max_bytes=cfg.max_attachment_bytes,
                    max_count=cfg.max_attachments,
                ),
            ),
            model=model,
            usage=ConversationUsage(store(req).usage_total(cid) if cid else None),
            account=_account(req),
            new_url=links.INDEX,
            search_url=links.SEARCH,
            import_url=links.IMPORT,
            export=export_links(cid) if cid else None,
        ),
    )
