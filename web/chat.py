"""Sending messages and streaming replies: send, stream, stop, regenerate, edit, versions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fasthtml.common import H1, APIRouter, Div, Input, Response, to_xml
from pydantic_ai.messages import ModelRequest, UserPromptPart
from starlette.requests import Request
from starlette.responses import RedirectResponse

from chat import sse
from chat.agent import short_title
from chat.markdown import render
from chat.runs import Run
from components.messages import (
    AssistantMessage,
    EditForm,
    ReplyFooter,
    SafeHTML,
    Tail,
    TitleRefresh,
    UserMessage,
)
from web.views import (
    check_message,
    error_fragment,
    html,
    is_htmx,
    load_json,
    messages_view,
    runs,
    settings,
    sidebar,
    store,
    turn_links,
    uid,
)

ar = APIRouter()


def _owned_turn(req: Request, cid: str, tid: int) -> tuple[dict, dict] | None:
    conv = store(req).conversation(cid, uid(req))
    turn = store(req).turn(tid, uid(req)) if conv else None
    if conv is None or turn is None or turn["conversation_id"] != cid:
        return None
    return conv, turn


def _start(req: Request, conv: dict, text: str, *, parent_id: int | None | str = "head") -> dict:
    """Commit the user's message, then start its reply as a server-owned run."""
    turn = store(req).add_turn(
        conv["id"],
        text,
        [ModelRequest(parts=[UserPromptPart(content=text)])],
        model=conv["model"] or settings(req).model or "demo",
        parent_id=parent_id,
    )
    runs(req).start(turn, uid(req))
    return turn


@ar("/send", methods=["post"])
async def send(req: Request, msg: str = "", cid: str = ""):
    """Commit a message, start its reply, answer with both messages (the reply streams)."""
    from web.pages import conversation

    if (problem := check_message(req, msg)) is not None:
        return problem
    conv = store(req).conversation(cid, uid(req)) if cid else None
    if cid and conv is None:
        return error_fragment("That conversation does not exist.", 404)
    created = conv is None
    if created:
        conv = store(req).create_conversation(uid(req), model=settings(req).model)
        conv["title"] = short_title(msg)
        store(req).set_title(conv["id"], conv["title"])
    turn = _start(req, conv, msg)
    url = conversation.to(cid=conv["id"])
    if not is_htmx(req):
        return RedirectResponse(url, status_code=303)
    links = turn_links(turn, store(req).siblings(conv["id"]))
    parts = [
        UserMessage(turn, links),
        AssistantMessage(turn["id"], links=links, live=True),
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
            Div(id="welcome", hx_swap_oob="delete"),
        ]
        headers["HX-Push-Url"] = url
    return html(tuple(parts), headers=headers)


@ar("/c/{cid}/turns/{tid}/stream", methods=["get"])
async def stream(req: Request, cid: str, tid: int):
    """Attach to a reply: replay what it has produced so far, then follow it live.

    Never starts a model call. A finished reply is served from the database.
    """
    from web.pages import not_found

    owned = _owned_turn(req, cid, tid)
    if owned is None:
        return not_found(req)
    conv, turn = owned
    try:
        start = max(0, int(req.headers.get("last-event-id") or 0))
    except ValueError:
        start = 0
    run = runs(req).get(tid)
    links = turn_links(turn, store(req).siblings(cid))
    chunks = _live(req, run, turn, links, start) if run else _stored(req, turn, links, start)
    return sse.event_stream(chunks, accept_encoding=req.headers.get("accept-encoding", ""))


def _title_refresh(turn: dict, status: str):
    """After a first exchange completes, fetch the title the model is writing for it."""
    from web.pages import title

    if turn["parent_id"] is None and status == "complete":
        return TitleRefresh(title.to(cid=turn["conversation_id"]))
    return None


async def _live(req: Request, run: Run, turn: dict, links, start: int) -> AsyncIterator[str]:
    heartbeat = settings(req).heartbeat
    async for kind, data in run.follow(start_block=start, heartbeat=heartbeat):
        if kind == "blocks":
            new, total = data
            yield sse.event("blocks", to_xml(SafeHTML("".join(new))), id=str(total))
        elif kind == "tail":
            yield sse.event("tail", " " if run.done else to_xml(Tail(data)))
        elif kind == "ping":
            yield sse.comment()
        else:
            conv = store(req).conversation(run.conversation_id, run.owner)
            footer = ReplyFooter(
                run.turn_id,
                run.status,
                links=links,
                error=run.error,
                usage=run.usage,
                model=run.model_name,
                last=bool(conv and conv["head_turn_id"] == run.turn_id),
                extra=_title_refresh(turn, run.status),
            )
            yield sse.event("end", to_xml(footer) or " ")
            yield sse.event("done", run.status)


async def _stored(req: Request, turn: dict, links, start: int) -> AsyncIterator[str]:
    conv = store(req).conversation(turn["conversation_id"], uid(req))
    body = render(turn["reply_text"])
    chunk = SafeHTML(body) if body else ""
    if start == 0:
        yield sse.event("blocks", to_xml(chunk) or " ", id="1")
    else:
        # The client already holds some live blocks: replace them all at once.
        swap = Div(chunk, cls="md", id=f"md-{turn['id']}", hx_swap_oob="true")
        yield sse.event("blocks", to_xml(swap))
    yield sse.event("tail", " ")
    footer = ReplyFooter(
        turn["id"],
        turn["status"],
        links=links,
        error=turn["error"],
        usage=load_json(turn["usage"]),
        model=turn["model"],
        last=conv is not None and conv["head_turn_id"] == turn["id"],
        extra=_title_refresh(turn, turn["status"]),
    )
    yield sse.event("end", to_xml(footer) or " ")
    yield sse.event("done", turn["status"])


@ar("/c/{cid}/turns/{tid}/stop", methods=["post"])
async def stop(req: Request, cid: str, tid: int):
    """Stop a reply; what it produced so far is kept and saved as stopped."""
    from web.pages import not_found

    if _owned_turn(req, cid, tid) is None:
        return not_found(req)
    runs(req).stop(tid)
    return Response(status_code=204)


@ar("/c/{cid}/turns/{tid}/regenerate", methods=["post"])
async def regenerate(req: Request, cid: str, tid: int):
    """Answer the same message again, as a new version of the exchange (also: Retry)."""
    from web.pages import not_found

    owned = _owned_turn(req, cid, tid)
    if owned is None:
        return not_found(req)
    conv, turn = owned
    if not runs(req).accepting:
        return error_fragment("The server is restarting. Try again in a moment.", 503)
    _start(req, conv, turn["user_text"], parent_id=turn["parent_id"])
    return messages_view(req, store(req).conversation(cid, uid(req)))


@ar("/c/{cid}/turns/{tid}/edit", methods=["get"])
async def edit_form(req: Request, cid: str, tid: int):
    """The in-place form to edit a sent message."""
    from web.pages import not_found

    owned = _owned_turn(req, cid, tid)
    if owned is None:
        return not_found(req)
    _, turn = owned
    links = turn_links(turn, store(req).siblings(cid))
    return EditForm(turn, links, max_chars=settings(req).max_message_chars)


@ar("/c/{cid}/turns/{tid}/user", methods=["get"])
async def user_message(req: Request, cid: str, tid: int):
    """A sent message as shown in the list (used to cancel an edit)."""
    from web.pages import not_found

    owned = _owned_turn(req, cid, tid)
    if owned is None:
        return not_found(req)
    _, turn = owned
    return UserMessage(turn, turn_links(turn, store(req).siblings(cid)))


@ar("/c/{cid}/turns/{tid}/edit", methods=["post"])
async def edit(req: Request, cid: str, tid: int, msg: str = ""):
    """Send an edited message as a new version of the exchange; the old one is kept."""
    from web.pages import not_found

    owned = _owned_turn(req, cid, tid)
    if owned is None:
        return not_found(req)
    if (problem := check_message(req, msg)) is not None:
        return problem
    conv, turn = owned
    _start(req, conv, msg, parent_id=turn["parent_id"])
    return messages_view(req, store(req).conversation(cid, uid(req)))


@ar("/c/{cid}/turns/{tid}/show", methods=["post"])
async def show(req: Request, cid: str, tid: int):
    """Show another version of an exchange (and the newest conversation that follows it)."""
    from web.pages import not_found

    owned = _owned_turn(req, cid, tid)
    if owned is None:
        return not_found(req)
    store(req).set_head(cid, store(req).newest_leaf(tid))
    return messages_view(req, store(req).conversation(cid, uid(req)))
