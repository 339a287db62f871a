"""Streaming a reply: attach to a run and follow it live, or replay a finished reply stored.

The stream never starts a model call: a reply is started by a send (web/chat.py) and any number
of streams (tabs, reloads, reconnects) attach to it. Store work and rendering run off the loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fasthtml.common import APIRouter, Div, Response, to_xml
from starlette.background import BackgroundTask
from starlette.requests import Request

from chat import sse
from chat.runlog import Block, Entry, ToolUpdate
from chat.store import now
from components.messages import (
    ConversationUsage,
    ReplyFooter,
    TitleRefresh,
    ToolCall,
    safe_html_markup,
    tail_markup,
)
from web import links as urls
from web.links import turn_links
from web.request import off_loop, owned_turn, runs, settings, store, uid
from web.views import load_json, reply_body

ar = APIRouter()


@ar(urls.STREAM, methods=["get"])
async def stream(req: Request, cid: str, tid: int):
    """Attach to a reply: replay what it has produced so far, then follow it live.

    Never starts a model call. A reply being written (by this process or, with REDIS_URL,
    another) is followed through its run log; a finished one is served from the database.
    """
    # The run first, then the row: a run that ends meanwhile has saved its row before it is
    # dropped, so a missing run never meets a row still marked as streaming.
    run = runs(req).get(tid)
    conv, turn = await off_loop(owned_turn, req, cid, tid)
    try:
        start = max(0, int(req.headers.get("last-event-id") or 0))
    except ValueError:
        start = 0
    links = turn_links(turn, await off_loop(store(req).siblings, cid, [turn["parent_id"]]))
    heartbeat = settings(req).heartbeat
    entries = run.follow(start, heartbeat) if run else runs(req).follow(turn, start, heartbeat)
    chunks = _live(req, entries, turn, links) if entries else _stored(req, turn, links, start)
    limits, who = req.app.state.limits, uid(req)
    if not await limits.open_stream(who):
        return Response("Too many open streams: close some tabs.", status_code=429)
    response = sse.event_stream(chunks, accept_encoding=req.headers.get("accept-encoding", ""))
    # Runs when the stream ends or the client goes away, so the slot is always given back.
    response.background = BackgroundTask(limits.close_stream, who)
    return response


def _title_refresh(turn: dict, status: str):
    """After a first exchange completes, fetch the title the model is writing for it."""
    if turn["parent_id"] is None and status == "complete":
        return TitleRefresh(urls.url(urls.TITLE, cid=turn["conversation_id"]))
    return None


async def _live(
    req: Request, entries: AsyncIterator[Entry | None], turn: dict, links
) -> AsyncIterator[str]:
    """A reply's run log as SSE events: `blocks` (id: the entry number), `tail`, then `end`
    and `done`. Entries are already merged per wake-up, so a slow client skips stale tails."""
    async for entry in entries:
        if entry is None:
            yield sse.comment()
            continue
        if entry.items:
            markup = _items_markup(entry.items)
            yield sse.event("blocks", markup, id=str(entry.seq))
        if entry.tail is not None or entry.end is not None:
            yield sse.event("tail", " " if entry.end else tail_markup(entry.tail))
        if (end := entry.end) is not None:
            cid, owner = turn["conversation_id"], uid(req)
            conv, spent = await off_loop(_conv_and_usage, req, cid, owner)
            footer = ReplyFooter(
                turn["id"],
                end.status,
                links=links,
                error=end.error,
                usage=end.usage,
                model=end.model or turn["model"],
                last=bool(conv and conv["head_turn_id"] == turn["id"]),
                copy=end.copy,
                extra=_title_refresh(turn, end.status),
                when=now(),
            )
            total = ConversationUsage(spent, oob=True)
            yield sse.event("end", to_xml((*footer, total)))
            yield sse.event("done", end.status)
            return


def _conv_and_usage(req: Request, cid: str, owner: str) -> tuple[dict | None, dict]:
    return store(req).conversation(cid, owner), store(req).usage_total(cid)


def _items_markup(new: list) -> str:
    """The markup of a batch of new items. A tool call whose result arrived in the same batch
    is drawn finished at once: an out-of-band update would come before its target exists."""
    done = {i.tool.id: i.tool for i in new if isinstance(i, ToolUpdate)}
    shown = {i.id for i in new if not isinstance(i, Block | ToolUpdate)}
    return "".join(
        _item_markup(done.get(i.id, i) if i.id in shown else i)
        if not isinstance(i, Block | ToolUpdate)
        else ("" if isinstance(i, ToolUpdate) and i.tool.id in shown else _item_markup(i))
        for i in new
    )


def _item_markup(item) -> str:
    """A new item of a live reply: a finished block, a tool call, or a tool call's update."""
    if isinstance(item, Block):
        return safe_html_markup(item.html)
    if isinstance(item, ToolUpdate):
        return to_xml(ToolCall(item.tool, oob=True))
    return to_xml(ToolCall(item))


async def _stored(req: Request, turn: dict, links, start: int) -> AsyncIterator[str]:
    if turn["status"] == "streaming":  # no run is generating it any more: it was cut off
        turn = {**turn, "status": "interrupted", "error": "This reply was interrupted."}
    conv = await off_loop(store(req).conversation, turn["conversation_id"], uid(req))
    blocks = await off_loop(_stored_blocks, turn, start)
    yield blocks
    yield sse.event("tail", " ")
    footer = ReplyFooter(
        turn["id"],
        turn["status"],
        links=links,
        error=turn["error"],
        usage=load_json(turn["usage"]),
        model=turn["model"],
        last=conv is not None and conv["head_turn_id"] == turn["id"],
        copy=bool(turn["reply_text"]),
        extra=_title_refresh(turn, turn["status"]),
        when=turn.get("finished_at") or turn.get("created_at"),
    )
    yield sse.event("end", to_xml(footer) or " ")
    yield sse.event("done", turn["status"])


def _stored_blocks(turn: dict, start: int) -> str:
    """A stored reply as its one `blocks` event (rendering it may take a while: off the loop)."""
    chunk = reply_body(turn)
    if start == 0:
        return sse.event("blocks", to_xml(chunk) or " ", id="1")
    # The client already holds some live blocks: replace them all at once.
    swap = Div(*chunk, cls="md", id=f"md-{turn['id']}", hx_swap_oob="true")
    return sse.event("blocks", to_xml(swap))
