"""Sending messages: send, stop, regenerate, edit, versions.

Thin adapters over the chat service (chat/service.py), which holds the rules (what may be sent,
when, by whom) and the user's send lock: a handler parses the form, calls the service and
renders the answer, or the service's refusal as an inline error. Store work and rendering never
run on the event loop: read-only handlers are plain `def`s (run in a worker thread by FastHTML),
and the async ones render through `off_loop`. The stream that follows the runs these start is
web/stream.py.
"""

from __future__ import annotations

from fasthtml.common import H1, APIRouter, Div, Input, Response, Title
from starlette.requests import Request
from starlette.responses import RedirectResponse

from chat.service import NotFound, Refused, Sent
from components.messages import (
    AssistantMessage,
    CompareColumns,
    EditForm,
    UserMessage,
)
from web import links as urls
from web.links import export_links, turn_links
from web.request import (
    caller,
    chat_service,
    is_htmx,
    missing,
    off_loop,
    owned_turn,
    settings,
    store,
    uid,
)
from web.responses import error_fragment, html
from web.views import messages_view, sidebar

ar = APIRouter()


def _refusal(refusal: Refused) -> Response:
    """A refused send as the composer's inline error; the typed text stays."""
    response = error_fragment(refusal.message, refusal.status)
    response.headers.update(refusal.headers)
    return response


@ar(urls.SEND, methods=["post"])
async def send(
    req: Request,
    msg: str = "",
    cid: str = "",
    model: str = "",
    persona: str = "",
    compare: list[str] | None = None,
    att: list[str] | None = None,
):
    """Commit a message, start its reply, answer with both messages (the reply streams).

    With two or more `compare` models, one reply per model streams side by side; each is a
    version of the exchange, and the first is kept until the user keeps another. `att` are the
    ids of the files attached in the composer (uploaded already, see web/attachments.py).
    """
    try:
        sent = await chat_service(req).send(
            caller(req),
            msg,
            cid=cid or None,
            model=model,
            persona=persona,
            compare=compare or (),
            files=att or (),
        )
    except Refused as refusal:
        return _refusal(refusal)
    url = urls.conversation(sent.conversation["id"])
    if not is_htmx(req):
        return RedirectResponse(url, status_code=303)
    return await off_loop(_sent, req, sent, url)


def _sent(req: Request, sent: Sent, url: str):
    """The answer to a send: the user's message, the streaming replies, and side updates."""
    conv, turns, created = sent.conversation, sent.turns, sent.created
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
    try:
        await chat_service(req).stop(caller(req), cid, tid)
    except NotFound:
        raise missing() from None
    return Response(status_code=204)


@ar(urls.REGENERATE, methods=["post"])
async def regenerate(req: Request, cid: str, tid: int):
    """Answer the same message again, as a new version of the exchange (also: Retry)."""
    try:
        await chat_service(req).regenerate(caller(req), cid, tid)
    except NotFound:
        raise missing() from None
    except Refused as refusal:
        return _refusal(refusal)
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
    try:
        await chat_service(req).edit(caller(req), cid, tid, msg)
    except NotFound:
        raise missing() from None
    except Refused as refusal:
        return _refusal(refusal)
    return await off_loop(_current_view, req, cid)


@ar(urls.SHOW, methods=["post"])
def show(req: Request, cid: str, tid: int):
    """Show another version of an exchange (and the newest conversation that follows it)."""
    owned_turn(req, cid, tid)
    store(req).set_head(cid, store(req).newest_leaf(tid))
    return messages_view(req, store(req).conversation(cid, uid(req)))
