"""Sending messages: send, stop, regenerate, edit, versions.

The store and rendering never run on the event loop: read-only handlers are plain `def`s (run
in a worker thread by FastHTML), and the handlers that also start or follow runs (which live on
the loop) do their store work through `off_loop`. A user's sends are serialized by a lock, so
the checks made before committing still hold when the reply starts.

Send, regenerate and edit share the send lock, the commit and the start of a run; the stream
that follows the runs they start is web/stream.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from zlib import crc32

from fasthtml.common import H1, APIRouter, Div, Input, Response, Title
from pydantic_ai.messages import ModelRequest, UserPromptPart
from starlette.requests import Request
from starlette.responses import RedirectResponse

from chat.agent import short_title
from components.messages import (
    AssistantMessage,
    CompareColumns,
    EditForm,
    UserMessage,
)
from web import links as urls
from web.links import export_links, turn_links
from web.request import is_htmx, off_loop, owned_turn, runs, settings, store, uid
from web.responses import BUSY, error_fragment, html
from web.sending import check_message
from web.views import messages_view, sidebar

ar = APIRouter()


def normalize(msg: str) -> str:
    """Browsers send line breaks as CRLF; the textarea (and its maxlength) counts one each."""
    return msg.replace("\r\n", "\n").replace("\r", "\n")


def _send_lock(req: Request) -> asyncio.Lock:
    """The user's send lock: from the checks before a send to its run having started, no other
    send of the same user may pass the same checks (the commit in between runs in a thread).
    Striped, so there are never more than 64, however many users."""
    locks = getattr(req.app.state, "send_locks", None)
    if locks is None:
        locks = req.app.state.send_locks = [asyncio.Lock() for _ in range(64)]
    return locks[crc32(uid(req).encode()) % len(locks)]


def _commit(req: Request, conv: dict, text: str, *, parent_id: int | None | str = "head") -> dict:
    """Commit the user's message as a new turn (blocking: call it off the loop)."""
    return store(req).add_turn(
        conv["id"],
        text,
        [ModelRequest(parts=[UserPromptPart(content=text)])],
        model=conv["model"] or settings(req).model or "demo",
        parent_id=parent_id,
    )


async def _start(
    req: Request, conv: dict, text: str, *, parent_id: int | None | str = "head"
) -> dict:
    """Commit the user's message, then start its reply as a server-owned run."""
    turn = await off_loop(_commit, req, conv, text, parent_id=parent_id)
    runs(req).start(turn, uid(req))
    return turn


@ar(urls.SEND, methods=["post"])
async def send(
    req: Request,
    msg: str = "",
    cid: str = "",
    model: str = "",
    persona: str = "",
    compare: list[str] | None = None,
):
    """Commit a message, start its reply, answer with both messages (the reply streams).

    With two or more `compare` models, one reply per model streams side by side; each is a
    version of the exchange, and the first is kept until the user keeps another.
    """
    msg = normalize(msg)
    cfg = settings(req)
    models = list(dict.fromkeys(m for m in (compare or []) if m))
    if model and model not in cfg.choices or any(m not in cfg.choices for m in models):
        return error_fragment("That model is not offered here. Pick one from the list.", 422)
    if persona and persona not in runs(req).personas:
        return error_fragment("That persona does not exist. Pick one from the list.", 422)
    try:
        async with _send_lock(req):
            return await _send(req, msg, cid, model, persona, models)
    except sqlite3.OperationalError:  # the write lock stayed taken past the busy timeout
        return error_fragment(BUSY, 503)


async def _send(req: Request, msg: str, cid: str, model: str, persona: str, models: list[str]):
    conv = await off_loop(store(req).conversation, cid, uid(req)) if cid else None
    if cid and conv is None:
        return error_fragment("That conversation does not exist.", 404)
    replies = len(models) if len(models) >= 2 else 1
    busy = conv["id"] if conv is not None else None
    if (problem := await check_message(req, msg, replies, cid=busy)) is not None:
        return problem
    created = conv is None
    persona = persona or (None if conv else next(iter(runs(req).personas)))
    conv = await off_loop(_prepare, req, conv, msg, model or None, persona)
    if len(models) >= 2:
        parent = conv["head_turn_id"]
        turns = [await _start(req, {**conv, "model": m}, msg, parent_id=parent) for m in models]
        await off_loop(store(req).set_head, conv["id"], turns[0]["id"])
    else:
        turns = [await _start(req, conv, msg)]
    url = urls.conversation(conv["id"])
    if not is_htmx(req):
        return RedirectResponse(url, status_code=303)
    return await off_loop(_sent, req, conv, turns, created, url)


def _prepare(req: Request, conv: dict | None, msg: str, model: str | None, persona: str | None):
    """Create the conversation, or switch its model and persona, before the message is sent."""
    if conv is None:
        conv = store(req).create_conversation(
            uid(req), model=model or settings(req).default_model, persona=persona
        )
        conv["title"] = short_title(msg)
        store(req).set_title(conv["id"], conv["title"])
        return conv
    if model and model != conv["model"]:
        store(req).set_model(conv["id"], model)
        conv["model"] = model
    if persona and persona != conv["persona"]:
        store(req).set_persona(conv["id"], persona)
        conv["persona"] = persona
    return conv


def _sent(req: Request, conv: dict, turns: list[dict], created: bool, url: str):
    """The answer to a send: the user's message, the streaming replies, and side updates."""
    siblings = store(req).siblings(conv["id"], {t["parent_id"] for t in turns})
    links = [turn_links(t, siblings) for t in turns]
    if len(turns) == 1:
        replies = AssistantMessage(turns[0]["id"], links=links[0], live=True)
    else:
        replies = CompareColumns(
            [
                (t["model"], AssistantMessage(t["id"], links=lk, live=True), _show_url(t))
                for t, lk in zip(turns, links, strict=True)
            ]
        )
    parts = [
        UserMessage(turns[0], links[0]),
        replies,
        Div(id="composer-error", cls="composer-error", role="alert", hx_swap_oob="true"),
    ]
    headers = {}
    if created:
        side = sidebar(req, conv["id"])
        side.attrs["hx-swap-oob"] = "true"
        parts += [
            side,
            Input(type="hidden", name="cid", value=conv["id"], id="cid", hx_swap_oob="true"),
            H1(conv["title"], id="chat-title", hx_swap_oob="true"),
            Title(f"{conv['title']} · Agent chat"),
            _export_links(conv["id"]),
            Div(id="welcome", hx_swap_oob="delete"),
        ]
        headers["HX-Push-Url"] = url
    return html(tuple(parts), headers=headers)


def _export_links(cid: str):
    links = export_links(cid)
    links.attrs["hx-swap-oob"] = "true"
    return links


def _show_url(turn: dict) -> str:
    return urls.url(urls.SHOW, cid=turn["conversation_id"], tid=turn["id"])


@ar(urls.STOP, methods=["post"])
async def stop(req: Request, cid: str, tid: int):
    """Stop a reply; what it produced so far is kept and saved as stopped."""
    await off_loop(owned_turn, req, cid, tid)
    await runs(req).stop(tid)
    return Response(status_code=204)


@ar(urls.REGENERATE, methods=["post"])
async def regenerate(req: Request, cid: str, tid: int):
    """Answer the same message again, as a new version of the exchange (also: Retry)."""
    try:
        async with _send_lock(req):
            conv, turn = await off_loop(owned_turn, req, cid, tid)
            if (problem := await check_message(req, turn["user_text"], cid=cid)) is not None:
                return problem
            await _start(req, conv, turn["user_text"], parent_id=turn["parent_id"])
    except sqlite3.OperationalError:
        return error_fragment(BUSY, 503)
    return await off_loop(_current_view, req, cid)


def _current_view(req: Request, cid: str) -> tuple:
    return messages_view(req, store(req).conversation(cid, uid(req)))


@ar(urls.EDIT, methods=["get"])
def edit_form(req: Request, cid: str, tid: int):
    """The in-place form to edit a sent message."""
    _, turn = owned_turn(req, cid, tid)
    controls = turn_links(turn, store(req).siblings(cid, [turn["parent_id"]]))
    return EditForm(turn, controls, max_chars=settings(req).max_message_chars)


@ar(urls.USER_MESSAGE, methods=["get"])
def user_message(req: Request, cid: str, tid: int):
    """A sent message as shown in the list (used to cancel an edit)."""
    _, turn = owned_turn(req, cid, tid)
    return UserMessage(turn, turn_links(turn, store(req).siblings(cid, [turn["parent_id"]])))


@ar(urls.EDIT, methods=["post"])
async def edit(req: Request, cid: str, tid: int, msg: str = ""):
    """Send an edited message as a new version of the exchange; the old one is kept."""
    msg = normalize(msg)
    try:
        async with _send_lock(req):
            conv, turn = await off_loop(owned_turn, req, cid, tid)
            if (problem := await check_message(req, msg, cid=cid)) is not None:
                return problem
            await _start(req, conv, msg, parent_id=turn["parent_id"])
    except sqlite3.OperationalError:
        return error_fragment(BUSY, 503)
    return await off_loop(_current_view, req, cid)


@ar(urls.SHOW, methods=["post"])
def show(req: Request, cid: str, tid: int):
    """Show another version of an exchange (and the newest conversation that follows it)."""
    owned_turn(req, cid, tid)
    store(req).set_head(cid, store(req).newest_leaf(tid))
    return messages_view(req, store(req).conversation(cid, uid(req)))
