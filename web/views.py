"""Helpers shared by the routes: who is asking, and how the app's state becomes components."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from fastcore.xml import FT
from fasthtml.common import H1, A, Body, Div, Html, P, Response, Title, to_xml
from fasthtml.common import Head as HtmlHead
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from chat.config import Settings
from chat.markdown import RENDER_BUDGET, RENDER_VERSION, plain, render
from chat.reply import segments
from chat.runs import RunManager
from chat.storage import Store
from chat.store import load_messages
from components.auth import SignOut
from components.composer import Composer
from components.head import Head
from components.layout import ExportLinks, Page, Welcome
from components.messages import (
    AssistantMessage,
    ConversationUsage,
    LoadEarlier,
    LoadLater,
    SafeHTML,
    Segments,
    TurnLinks,
    UserMessage,
)
from components.sidebar import ConvLinks, Sidebar

T = TypeVar("T")

# Rendering a page's replies may take this long in all; the rest are shown as plain text (and
# not cached as such: the next view renders them properly).
PAGE_RENDER_BUDGET = 2.0


async def off_loop(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run blocking work (the store, big renders) in the request thread pool, not on the loop.

    Handlers that only read and render are plain `def`s, which FastHTML already runs there;
    this is for the async handlers and streams that also need the loop (runs, waiting).
    """
    return await run_in_threadpool(partial(fn, *args, **kwargs))


def store(req: Request) -> Store:
    """The app's store (the SQLite ChatStore unless a fork swaps it)."""
    return req.app.state.store


def runs(req: Request) -> RunManager:
    """The app's RunManager."""
    return req.app.state.runs


def settings(req: Request) -> Settings:
    """The app's Settings."""
    return req.app.state.settings


def uid(req: Request) -> str:
    """The identity of the browser (or account) making the request."""
    return req.scope["uid"]


def client_addr(req: Request) -> str:
    """The client's address for the limits (X-Forwarded-For only from TRUSTED_PROXIES)."""
    peer = req.client.host if req.client else None
    return req.app.state.limits.address(peer, req.headers.get("x-forwarded-for"))


def is_htmx(req: Request) -> bool:
    """True for requests made by htmx rather than by plain navigation."""
    return req.headers.get("hx-request") == "true"


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


BUSY = "The server is busy saving other changes. Try again in a moment."


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


def check_message(
    req: Request, msg: str, replies: int = 1, cid: str | None = None
) -> Response | None:
    """Why a message cannot be sent (as an error response), or None if it can.

    With `cid`, a reply still being written in that conversation refuses it too: the new turn's
    history would lack that reply. Called last before committing: a message that passes (and
    only one that passes) has been counted against the limits.
    """
    limit = settings(req).max_message_chars
    if not msg.strip():
        return error_fragment("Type a message before sending.", 422)
    if len(msg) > limit:
        return error_fragment(
            f"That message is {len(msg):,} characters; the limit is {limit:,}. "
            "Shorten it and send again.",
            413,
        )
    if not runs(req).accepting:
        return error_fragment("The server is restarting. Send again in a moment.", 503)
    if cid is not None and runs(req).streaming_in(cid):
        return error_fragment("Wait for the reply to finish, or stop it, before sending.", 409)
    refused = req.app.state.limits.check_send(
        uid(req),
        client_addr(req),
        running=runs(req).running(uid(req)),
        total_running=len(runs(req).runs),
        count=replies,
    )
    if refused:
        response = error_fragment(refused.message, refused.status)
        response.headers.update(refused.headers)
        return response
    return None


def load_json(raw: str | None) -> dict | None:
    """Parse a JSON column that may be empty."""
    return json.loads(raw) if raw else None


# Links ------------------------------------------------------------------------------------


def turn_links(turn: dict, siblings: dict[int | None, list[int]]) -> TurnLinks:
    """Every URL a turn's controls need, with its place among its versions."""
    from web import chat

    cid, tid = turn["conversation_id"], turn["id"]
    group = siblings.get(turn["parent_id"]) or [tid]
    i = group.index(tid) if tid in group else 0
    return TurnLinks(
        stream=chat.stream.to(cid=cid, tid=tid),
        stop=chat.stop.to(cid=cid, tid=tid),
        regenerate=chat.regenerate.to(cid=cid, tid=tid),
        edit_form=chat.edit_form.to(cid=cid, tid=tid),
        edit=chat.edit.to(cid=cid, tid=tid),
        user=chat.user_message.to(cid=cid, tid=tid),
        prev=chat.show.to(cid=cid, tid=group[i - 1]) if i > 0 else None,
        next=chat.show.to(cid=cid, tid=group[i + 1]) if i + 1 < len(group) else None,
        version=i + 1,
        versions=len(group),
    )


def conv_links(cid: str) -> ConvLinks:
    """Every URL a conversation's sidebar controls need."""
    from web import pages

    return ConvLinks(
        open=pages.conversation.to(cid=cid),
        rename_form=pages.rename_form.to(cid=cid),
        rename=pages.rename.to(cid=cid),
        delete=pages.delete.to(cid=cid),
        restore=pages.restore.to(cid=cid),
        item=pages.item.to(cid=cid),
    )


def export_links(cid: str) -> FT:
    """The conversation's Markdown and JSON download links."""
    from web import pages

    return ExportLinks(pages.export_md.to(cid=cid), pages.export_json.to(cid=cid))


# Views ------------------------------------------------------------------------------------


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
    if runs(req).get(tid) is not None:
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
    )


def message_items(req: Request, conv: dict, turns: list[dict]) -> tuple:
    """User messages and replies for `turns`, in order."""
    parents = {t["parent_id"] for t in turns}
    siblings = store(req).siblings(conv["id"], parents) if turns else {}
    render_cached(req, turns)
    items: list = []
    for turn in turns:
        links = turn_links(turn, siblings)
        items.append(UserMessage(turn, links))
        items.append(reply(req, turn, links, last=turn["id"] == conv["head_turn_id"]))
    return tuple(items)


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
    from web import pages

    return LoadEarlier(pages.older.to(cid=conv["id"], before=turns[0]["id"]))


def _later(conv: dict, turns: list[dict]) -> FT:
    from web import pages

    return LoadLater(pages.newer.to(cid=conv["id"], after=turns[-1]["id"]))


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
    from web.auth import logout

    return SignOut(logout.to(), req.scope.get("session", {}).get("username", ""))


def page(req: Request, conv: dict | None, *, items: tuple | None = None) -> tuple:
    """A whole chat page, for a conversation or for a new chat."""
    from web import chat, pages

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
                chat.send.to(),
                cid,
                max_chars=cfg.max_message_chars,
                choices=cfg.choices,
                model=model,
                personas={k: p.name for k, p in runs(req).personas.items()},
                persona=(conv or {}).get("persona") or next(iter(runs(req).personas)),
            ),
            model=model,
            usage=ConversationUsage(store(req).usage_total(cid) if cid else None),
            account=_account(req),
            new_url=pages.index.to(),
            search_url=pages.search.to(),
            import_url=pages.import_json.to(),
            export=export_links(cid) if cid else None,
        ),
    )
