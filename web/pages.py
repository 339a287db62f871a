"""Pages and the conversation list: open, page back, search, rename, delete, export, import.

Handlers that only read or write the store and render are plain `def`s: FastHTML runs those in
a worker thread, so a slow query, a held SQLite write lock or a costly render holds up only the
request that asked for it, never the event loop every other request shares.
"""

from __future__ import annotations

import asyncio
import re

from fasthtml.common import H1, APIRouter, Div, Response, Title
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)

from chat.service import Refused
from chat.transcript import MAX_IMPORT_BYTES, json_chunks, markdown_chunks
from components.messages import Feedback
from components.sidebar import (
    ConversationLink,
    DeletedItem,
    RenameForm,
    SearchResults,
)
from web import links
from web.links import conv_links
from web.request import (
    caller,
    chat_service,
    is_htmx,
    missing,
    off_loop,
    owned_conversation,
    owned_turn,
    runs,
    settings,
    store,
    uid,
)
from web.responses import error_fragment, html
from web.views import later_page, new_chat_updates, page, window, window_at

ar = APIRouter()


@ar(links.INDEX, methods=["get"])
def index(req: Request):
    """A new chat."""
    return page(req, None)


@ar(links.CONVERSATION, methods=["get"])
def conversation(req: Request, cid: str, at: int | None = None):
    """A conversation. With `at`, a page of the branch that holds that turn (a search result)."""
    if at is None:
        return page(req, owned_conversation(req, cid))
    conv, turn = owned_turn(req, cid, at)
    conv = {**conv, "head_turn_id": store(req).newest_leaf(at)}
    return page(req, conv, items=window_at(req, conv, turn))


@ar(links.OLDER, methods=["get"])
def older(req: Request, cid: str, before: int):
    """The page of messages before turn `before` on the shown branch."""
    conv, first = owned_turn(req, cid, before)
    if first["parent_id"] is None:
        return Div(id="earlier")
    return Div(*window(req, conv, first["parent_id"]), id="earlier-page", cls="earlier-page")


@ar(links.NEWER, methods=["get"])
def newer(req: Request, cid: str, after: int | None = None):
    """The page of messages after turn `after`, on the branch shown for it (opened at a turn)."""
    conv, last = owned_turn(req, cid, after)
    conv = {**conv, "head_turn_id": store(req).newest_leaf(after)}
    return Div(*later_page(req, conv, last), id="later-page", cls="later-page")


@ar(links.SOURCE, methods=["get"])
def source(req: Request, cid: str, tid: int):
    """A reply's Markdown as the model wrote it (tables and fences kept): what Copy copies."""
    _, turn = owned_turn(req, cid, tid)
    run = runs(req).get(tid)  # a reply still being written: the text so far
    text = run.renderer.source if run is not None else turn["reply_text"] or ""
    return PlainTextResponse(
        text, media_type="text/markdown; charset=utf-8", headers={"Cache-Control": "no-store"}
    )


@ar(links.SEARCH, methods=["get"])
def search(req: Request, q: str = ""):
    """Search the user's conversation titles and messages by word prefix; each result links to
    its conversation or message."""
    results = store(req).search(uid(req), q[:200]) if q.strip() else []
    urls = [
        links.conversation(r["conversation_id"])
        if r["turn_id"] is None
        else links.conversation(r["conversation_id"], at=r["turn_id"]) + f"#turn-{r['turn_id']}"
        for r in results
    ]
    return SearchResults(q, results, urls)


@ar(links.ITEM, methods=["get"])
def item(req: Request, cid: str):
    """A conversation's entry in the sidebar (used to cancel a rename)."""
    conv = owned_conversation(req, cid)
    return ConversationLink(conv, conv_links(cid), current=_is_current(req, cid))


@ar(links.RENAME, methods=["get"])
def rename_form(req: Request, cid: str):
    """The in-place rename form."""
    return RenameForm(owned_conversation(req, cid), conv_links(cid))


@ar(links.RENAME, methods=["post"])
def rename(req: Request, cid: str, title: str = ""):
    """Rename a conversation."""
    owned_conversation(req, cid)
    title = " ".join(title.split())[:200]
    if not title:
        return error_fragment("A title cannot be empty.", 422, target=f"#rename-{cid}")
    store(req).rename(cid, uid(req), title)
    conv = owned_conversation(req, cid)
    return (
        ConversationLink(conv, conv_links(cid), current=_is_current(req, cid)),
        H1(title, id="chat-title", hx_swap_oob="true") if _is_current(req, cid) else None,
    )


def _is_current(req: Request, cid: str) -> bool:
    return req.headers.get("hx-current-url", "").split("?")[0].endswith(f"/c/{cid}")


@ar(links.DELETE, methods=["post"])
def delete(req: Request, cid: str):
    """Delete a conversation; the list offers Undo until the page changes. Deleting the open
    one turns the page into a new chat."""
    conv = owned_conversation(req, cid)
    if not store(req).delete(cid, uid(req)):
        raise missing()
    undo = DeletedItem(conv, conv_links(cid))
    if not _is_current(req, cid):
        return undo
    # The open conversation is gone: the page becomes a new chat (URL, title, messages and
    # the composer's target), and the list keeps its Undo.
    return html((undo, *new_chat_updates(req)), headers={"HX-Push-Url": links.INDEX})


@ar(links.FEEDBACK, methods=["post"])
def feedback(req: Request, cid: str, tid: int, value: str = ""):
    """Thumbs up or down on one of the user's replies ('' takes it back)."""
    owned_turn(req, cid, tid)
    if value not in ("up", "down", ""):
        return error_fragment("Feedback is 'up' or 'down'.", 422)
    store(req).set_feedback(tid, uid(req), value or None)
    return Feedback(links.url(links.FEEDBACK, cid=cid, tid=tid), value or None)


@ar(links.RESTORE, methods=["post"])
def restore(req: Request, cid: str):
    """Undo a deletion."""
    if not store(req).restore(cid, uid(req)):
        raise missing()
    conv = owned_conversation(req, cid)
    return ConversationLink(conv, conv_links(cid), current=_is_current(req, cid))


@ar(links.TITLE, methods=["get"])
async def title(req: Request, cid: str):
    """The conversation's title once the model has written it, as out-of-band updates."""
    await off_loop(owned_conversation, req, cid)
    await runs(req).titles.wait(cid)
    conv = await off_loop(owned_conversation, req, cid)
    li = ConversationLink(conv, conv_links(cid), current=True)
    li.attrs["hx-swap-oob"] = "true"
    heading = H1(conv["title"], id="chat-title", hx_swap_oob="true")
    return (li, heading, Title(f"{conv['title']} · Agent chat"))


def _filename(title: str, ext: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", title or "conversation").strip("-")[:60]
    return f"{stem or 'conversation'}.{ext}"


# Exports stream a page of turns at a time: Starlette reads a plain iterator in its thread pool,
# so neither the loop nor the memory holds a whole long conversation.
EXPORT_PAGE = 200


@ar(links.EXPORT_MD, methods=["get"])
def export_md(req: Request, cid: str):
    """Download the shown branch as Markdown."""
    conv = owned_conversation(req, cid)
    pages = store(req).branch_pages(conv["head_turn_id"], EXPORT_PAGE)
    return StreamingResponse(
        (chunk.encode() for chunk in markdown_chunks(conv["title"], pages)),
        media_type="text/markdown; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{_filename(conv["title"], "md")}"'},
    )


@ar(links.EXPORT_JSON, methods=["get"])
def export_json(req: Request, cid: str):
    """Download the shown branch as pydantic-ai messages (ModelMessagesTypeAdapter JSON)."""
    conv = owned_conversation(req, cid)
    pages = store(req).branch_pages(conv["head_turn_id"], EXPORT_PAGE)
    name = _filename(conv["title"], "json")
    return StreamingResponse(
        # With each attachment's bytes (the owner's only), read a page at a time.
        json_chunks(pages, files=lambda ids: store(req).attachment_data(uid(req), ids)),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@ar(links.IMPORT, methods=["post"])
async def import_json(req: Request, file: UploadFile | None = None):
    """Import an exported JSON file as a new conversation; a bad file changes nothing."""
    target = "#import-error"
    if file is None or not isinstance(file, UploadFile):
        return error_fragment("Choose a .json file to import.", 422, target=target)
    try:
        raw = await file.read(MAX_IMPORT_BYTES + 1)
    finally:
        await file.close()  # its spooled temporary file, now rather than at garbage collection
    try:
        conv = await chat_service(req).import_file(caller(req), raw, file.filename or "")
    except Refused as refusal:
        response = error_fragment(refusal.message, refusal.status, target)
        response.headers.update(refusal.headers)
        return response
    url = links.conversation(conv["id"])
    if is_htmx(req):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


@ar(links.HEALTH, methods=["get"])
async def health(req: Request):
    """Liveness: 200 with JSON. `runs` is this process's replies being written; with REDIS_URL,
    `runs_everywhere` is every process's (from their leases; null while Redis does not answer:
    liveness never waits on Redis)."""
    cfg = settings(req)
    manager = runs(req)
    body = {"status": "ok", "model": cfg.model or "demo", "runs": len(manager.runs)}
    if manager.cluster is not None:
        try:
            body["runs_everywhere"] = await asyncio.wait_for(manager.total_running(), 1.0)
        except Exception:  # Redis away or slow: this process is alive all the same
            body["runs_everywhere"] = None
    return JSONResponse(body)


@ar(links.READY, methods=["get"])
async def ready(req: Request):
    """Readiness: 200 while taking new replies, 503 once told to stop (draining, chat/drain.py),
    so a load balancer stops routing here while the running replies finish."""
    if runs(req).accepting:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "draining": True}, status_code=503)
